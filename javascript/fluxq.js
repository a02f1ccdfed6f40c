// Flux Quant tab: size presets and "Use this" write txt2img/img2img width/height (and Forge's GPU Weights) like
// WebUI extensions do: set the field, fire its input event, and the host's own handlers take it from there.
// "Get ..." buttons start the download of a model's missing part.
(function () {
    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    // Set a gradio number/slider field and fire its input event so gradio (and the WebUI) see the change.
    function setInputs(inputs, value) {
        var changed = false;
        inputs.forEach(function (input) {
            input.value = value;
            input.dispatchEvent(new Event("input", {bubbles: true}));
            changed = true;
        });
        return changed;
    }

    function setField(id, value) {
        return setInputs(root().querySelectorAll("#" + id + " input"), value);
    }

    // Forge's "GPU Weights (MB)" slider (no elem_id; its number box and range carry the label). Setting it here
    // rather than only on the server keeps the page and Forge agreeing: Forge applies the slider's value again on
    // its own change event, and would otherwise overwrite ours with the stale one the next time it is touched.
    window.fluxqSetGpuWeights = function (megabytes) {
        var value = parseInt(megabytes, 10);
        if (!(value >= 0)) return false;
        return setInputs(root().querySelectorAll('input[aria-label$="GPU Weights (MB)"]'), value);
    };

    // Writes WIDTHxHEIGHT into txt2img/img2img and says so next to the buttons: in the row of ``origin`` (the
    // clicked button) or, without one ("Use this"), in every preset row of the tab.
    window.fluxqSetSize = function (size, origin) {
        var match = /^(\d+)\s*[x×]\s*(\d+)$/.exec(String(size || "").trim());
        if (!match) return false;
        var done = false;
        ["txt2img", "img2img"].forEach(function (tab) {
            done = setField(tab + "_width", match[1]) | done;
            done = setField(tab + "_height", match[2]) | done;
        });
        var row = origin && origin.closest ? origin.closest(".fluxq-presets") : null;
        var statuses = row ? row.querySelectorAll(".fluxq-size-status")
            : root().querySelectorAll("#fluxq_root .fluxq-size-status");
        statuses.forEach(function (status) {
            status.textContent = done ? "txt2img / img2img size set to " + match[1] + "×" + match[2]
                : "size " + match[1] + "×" + match[2] + " (no txt2img tab on this page: set it in the WebUI)";
        });
        return Boolean(done);
    };

    // "Get ..." next to a missing part: the catalog key goes into the tab's off-screen field, then its button
    // starts the download like Get a model's (the server checks the key against the catalog).
    window.fluxqDownload = function (key) {
        var field = root().querySelector("#fluxq_part_key textarea, #fluxq_part_key input");
        var button = root().querySelector("#fluxq_part_btn");
        if (!field || !button) return false;
        field.value = key;
        field.dispatchEvent(new Event("input", {bubbles: true}));
        // gradio reads the field's new value on its next tick
        setTimeout(function () {
            button.click();
            var jobs = root().querySelector("#fluxq_dl_jobs");
            if (jobs && jobs.scrollIntoView) jobs.scrollIntoView({block: "center"});
        }, 50);
        return true;
    };

    // Preset and "Get" buttons live in HTML the tab re-renders; one delegated listener serves them all.
    document.addEventListener("click", function (event) {
        if (!event.target.closest) return;
        var size = event.target.closest("[data-fluxq-size]");
        if (size) window.fluxqSetSize(size.getAttribute("data-fluxq-size"), size);
        var get = event.target.closest("[data-fluxq-download]");
        if (get) window.fluxqDownload(get.getAttribute("data-fluxq-download"));
    });
})();
