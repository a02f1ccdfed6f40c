// Flux Quant tab: size presets and "Use this" write txt2img/img2img width/height like WebUI extensions do.
(function () {
    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    // Set a gradio number/slider field and fire its input event so gradio (and the WebUI) see the change.
    function setField(id, value) {
        var changed = false;
        root().querySelectorAll("#" + id + " input").forEach(function (input) {
            input.value = value;
            input.dispatchEvent(new Event("input", {bubbles: true}));
            changed = true;
        });
        return changed;
    }

    window.fluxqSetSize = function (size) {
        var match = /^(\d+)\s*[x×]\s*(\d+)$/.exec(String(size || "").trim());
        if (!match) return false;
        var done = false;
        ["txt2img", "img2img"].forEach(function (tab) {
            done = setField(tab + "_width", match[1]) | done;
            done = setField(tab + "_height", match[2]) | done;
        });
        var status = root().querySelector("#fluxq_size_status");
        if (status) {
            status.textContent = done ? "txt2img / img2img size set to " + match[1] + "×" + match[2]
                : "size " + match[1] + "×" + match[2] + " (no txt2img tab on this page: set it in the WebUI)";
        }
        return done;
    };

    // Preset buttons live in HTML the tab re-renders; one delegated listener serves them all.
    document.addEventListener("click", function (event) {
        var button = event.target.closest ? event.target.closest("[data-fluxq-size]") : null;
        if (button) window.fluxqSetSize(button.getAttribute("data-fluxq-size"));
    });
})();
