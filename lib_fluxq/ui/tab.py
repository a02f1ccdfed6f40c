"""The Flux Quant tab: one gradio Blocks used by the WebUI (scripts/fluxq_tab.py, on_ui_tabs) and by the standalone
app (``python -m lib_fluxq ui``).

Sections: This machine (editable, to plan for another card) · Recommendation · Your models · Use this · Get a model ·
Convert · Compare. Logic lives in handlers.py; long jobs run in lib_fluxq.jobs threads and the page polls them with a
short generator, so no request thread is held by a download or a conversion and generation is never blocked.
"""

from __future__ import annotations

import html
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from lib_fluxq import catalog, jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.ui import handlers
from lib_fluxq.ui.host import StandaloneHost

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
POLL_SECONDS = 0.3
DEFAULT_COMPARE_LEVELS = "Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,Q3_K,Q2_K,NF4"

# One runner per process: jobs survive page reloads and are shared by every browser tab.
RUNNER = jobs.JobRunner()


def _js(code: str) -> dict[str, str]:
    return {"js": code} if GRADIO_MAJOR >= 4 else {"_js": code}


def _poll_kwargs() -> dict[str, Any]:
    # gradio 4 runs one event of a kind at a time by default; progress polls must not queue behind each other
    return {"concurrency_limit": None, "show_progress": "hidden"} if GRADIO_MAJOR >= 4 else {"show_progress": False}


def _dropdown(choices: list[str], value: str | None = None, **kwargs: Any) -> Any:
    return gr.Dropdown(choices=choices, value=value if value is not None else (choices[0] if choices else None),
                       **kwargs)


def _update(**kwargs: Any) -> Any:
    return gr.update(**kwargs)


def build_tab(host: StandaloneHost, runner: jobs.JobRunner | None = None) -> gr.Blocks:
    """The tab for ``host`` (lib_fluxq.ui.host: standalone, Forge or A1111)."""
    runner = runner or RUNNER
    detected = handlers.detect_machine(host.models_dir)
    plot_dir = tempfile.mkdtemp(prefix="fluxq-ui-")

    def compute(gpu: str, vram: float | None, ram: float | None, size: str, model: str) -> dict[str, Any]:
        plan = handlers.make_plan(detected, gpu, vram, ram, size, model)
        inventory = handlers.inventory(host.scan_paths(), plan)
        files = None
        advisor = handlers.optional("lib_fluxq.advisor")
        if inventory is not None and advisor is not None:
            files = advisor.files_from_reports(inventory.reports)
        advice = handlers.advise(plan, files)
        return {"plan": plan, "inventory": inventory, "advice": advice}

    def refresh(gpu: str, vram: float | None, ram: float | None, size: str, model: str) -> tuple[Any, ...]:
        try:
            state = compute(gpu, vram, ram, size, model)
        except FluxqError as exc:
            error = handlers.error_html(exc)
            return error, _update(), "", _update(), _update(), _update()
        inventory = state["inventory"]
        if inventory is None:
            rows, note = [], handlers.not_available("The model inventory", "lib_fluxq.inspect")
        else:
            rows = handlers.model_rows(inventory, host.module_files(), handlers.plan_ram(state["plan"]))
            folders = ", ".join(host.scan_paths())
            note = (f'<div class="fluxq-small">{len(rows)} files in {folders}'
                    f'{"; " + inventory.note if inventory.note else ""}</div>')
        transformers = handlers.transformer_choices(inventory)
        sources = handlers.convertible_choices(inventory)
        return (handlers.recommendation_html(state["advice"], state["plan"]),
                handlers.table_html(handlers.MODEL_COLUMNS, rows), note,
                _update(choices=transformers, value=transformers[0] if transformers else None),
                _update(choices=sources, value=sources[0] if sources else None),
                _update(choices=["(synthetic slice)"] + sources))

    def watcher(kind: str) -> Callable[[], Iterator[str]]:
        def watch() -> Iterator[str]:
            while True:
                yield handlers.jobs_html(runner, kind)
                if not handlers.any_active(runner, kind):
                    return
                time.sleep(POLL_SECONDS)
        return watch

    def starter(kind: str, start: Callable[..., jobs.Job]) -> Callable[..., tuple[str, int | None]]:
        def run(*args: Any) -> tuple[str, int | None]:
            try:
                job = start(*args)
            except FluxqError as exc:
                return handlers.error_html(exc), None
            return handlers.jobs_html(runner, kind), job.id
        return run

    def cancel(job_id: int | None) -> None:
        if job_id is not None:
            runner.cancel(int(job_id))

    gpu0, vram0, ram0 = handlers.machine_fields(detected)
    initial = refresh(gpu0, vram0, ram0, handlers.SIZE_PRESETS[0], "dev")
    initial_values = [u["value"] if isinstance(u, dict) and "value" in u else u for u in initial]
    initial_choices = [u.get("choices", []) if isinstance(u, dict) else [] for u in initial]

    with gr.Blocks(analytics_enabled=False) as tab, gr.Column(elem_id="fluxq_root"):
        gr.HTML(f'<div class="fluxq-title">Flux Quant — see your machine, get the right file, use it '
                f'<span class="fluxq-small">({host.name}: {host.models_dir})</span></div>')
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, elem_classes=["fluxq-section"]):
                gr.Markdown("### This machine")
                gr.HTML(handlers.machine_html(detected), elem_id="fluxq_detected")
                gpu = gr.Textbox(label="GPU (name, to plan for another card)", value=gpu0, elem_id="fluxq_gpu")
                with gr.Row():
                    vram = gr.Number(label="VRAM (GB)", value=vram0, elem_id="fluxq_vram")
                    ram = gr.Number(label="RAM (GB)", value=ram0, elem_id="fluxq_ram")
                with gr.Row():
                    size = _dropdown(list(handlers.SIZE_PRESETS), label="Target size", elem_id="fluxq_size")
                    model = gr.Radio(["dev", "schnell"], value="dev", label="FLUX.1", elem_id="fluxq_model")
                with gr.Row():
                    plan_button = gr.Button("Plan", variant="primary", elem_id="fluxq_plan")
                    reset_button = gr.Button("Use detected values", elem_id="fluxq_reset")
            with gr.Column(scale=2, elem_classes=["fluxq-section"]):
                gr.Markdown("### Recommendation")
                recommendation = gr.HTML(initial_values[0], elem_id="fluxq_recommendation")

        with gr.Column(elem_classes=["fluxq-section"]):
            gr.Markdown("### Your models")
            models_note = gr.HTML(initial_values[2], elem_id="fluxq_models_note")
            models = gr.HTML(initial_values[1], elem_id="fluxq_models")
            rescan = gr.Button("Rescan folders", elem_id="fluxq_rescan")

        with gr.Column(elem_classes=["fluxq-section"]):
            gr.Markdown("### Use this")
            with gr.Row():
                use_choice = _dropdown(initial_choices[3], label="Flux checkpoint (best verdict first)",
                                       elem_id="fluxq_use_choice", scale=3)
                use_button = gr.Button("Use this", variant="primary", elem_id="fluxq_use", scale=1)
            use_result = gr.HTML(elem_id="fluxq_use_result")
            use_size = gr.Textbox(visible=False, elem_id="fluxq_use_size")
            use_gpu = gr.Textbox(visible=False, elem_id="fluxq_use_gpu")

        with gr.Column(elem_classes=["fluxq-section"]):
            gr.Markdown("### Get a model")
            gr.HTML(handlers.table_html(handlers.CATALOG_COLUMNS, handlers.catalog_rows()), elem_id="fluxq_catalog")
            with gr.Row():
                download_key = _dropdown([e.key for e in catalog.CATALOG], label="File", elem_id="fluxq_dl_key")
                token = gr.Textbox(label="Hugging Face token (only for gated repositories)", type="password",
                                   elem_id="fluxq_token")
            with gr.Row():
                download_button = gr.Button("Download", variant="primary", elem_id="fluxq_dl_btn")
                download_cancel = gr.Button("Stop (resumes later)", elem_id="fluxq_dl_cancel")
            download_jobs = gr.HTML(handlers.jobs_html(runner, "download"), elem_id="fluxq_dl_jobs")
            download_id = gr.State(None)

        with gr.Column(elem_classes=["fluxq-section"]):
            gr.Markdown("### Convert")
            if not handlers.convert_targets():
                gr.HTML(handlers.not_available("Converting", "lib_fluxq.convert"))
            with gr.Row():
                convert_src = _dropdown(initial_choices[4], label="Source (full-precision or FP8 Flux transformer)",
                                        elem_id="fluxq_convert_src", scale=3)
                targets = handlers.convert_targets()
                convert_type = _dropdown(targets, value="Q4_K" if "Q4_K" in targets else None, label="Convert to",
                                         elem_id="fluxq_convert_type", scale=1)
                recipe = gr.Radio(["default", "all"], value="default", label="Recipe", elem_id="fluxq_recipe",
                                  scale=1)
            with gr.Row():
                convert_button = gr.Button("Convert", variant="primary", elem_id="fluxq_convert_btn")
                convert_cancel = gr.Button("Cancel", elem_id="fluxq_convert_cancel")
            convert_jobs = gr.HTML(handlers.jobs_html(runner, "convert"), elem_id="fluxq_convert_jobs")
            convert_id = gr.State(None)

        with gr.Column(elem_classes=["fluxq-section"]):
            gr.Markdown("### Compare quantization levels")
            if handlers.optional("lib_fluxq.compare") is None:
                gr.HTML(handlers.not_available("The comparison", "lib_fluxq.compare"))
            with gr.Row():
                compare_src = _dropdown(initial_choices[5] or ["(synthetic slice)"], label="Weights",
                                        elem_id="fluxq_compare_src", scale=2)
                compare_levels = gr.Textbox(DEFAULT_COMPARE_LEVELS, label="Levels", elem_id="fluxq_compare_levels",
                                            scale=2)
                compare_button = gr.Button("Compare", variant="primary", elem_id="fluxq_compare_btn", scale=1)
            compare_jobs = gr.HTML(handlers.jobs_html(runner, "compare"), elem_id="fluxq_compare_jobs")
            compare_table = gr.HTML(elem_id="fluxq_compare_table")
            compare_plot = gr.Image(label="error vs size", type="filepath", interactive=False,
                                    elem_id="fluxq_compare_plot")

        # ------------------------------------------------------------------------------------------- events
        plan_inputs = [gpu, vram, ram, size, model]
        plan_outputs = [recommendation, models, models_note, use_choice, convert_src, compare_src]
        for trigger in (plan_button.click, rescan.click, model.change, size.change):
            trigger(refresh, inputs=plan_inputs, outputs=plan_outputs)
        reset_button.click(lambda: (gpu0, vram0, ram0), outputs=[gpu, vram, ram]).then(
            refresh, inputs=plan_inputs, outputs=plan_outputs)

        # the status goes next to the size button "Use this" just rendered (all preset rows if not rendered yet)
        # the size goes next to the size button "Use this" just rendered (all preset rows if not rendered yet); GPU
        # Weights into Forge's own slider, when the page has one
        use_size_js = ("(size, gpu) => { const app = typeof gradioApp === 'function' ? gradioApp() : document; "
                       "fluxqSetSize(size, app.querySelector('#fluxq_use_result .fluxq-presets')); "
                       "if (gpu) fluxqSetGpuWeights(gpu); return []; }")

        def use_this(checkpoint: str | None, *plan_args: Any) -> tuple[str, str, str]:
            if not checkpoint:
                error = FluxqError("no Flux checkpoint found in your folders: get one below")
                return handlers.error_html(error), "", ""
            try:
                state = compute(*plan_args)
                chosen = handlers.use_plan(checkpoint, host.module_files(), state["plan"], state["advice"])
                message = host.apply(chosen.checkpoint, chosen.modules, chosen.gpu_weights_mb)
            except FluxqError as exc:
                return handlers.error_html(exc), "", ""
            body = "<br>".join(html.escape(line) for line in chosen.message.splitlines())
            gpu = host.applied_gpu_weights_mb(chosen.gpu_weights_mb)
            return (f'<div class="fluxq-note">{body}</div><div class="fluxq-note">{html.escape(message)}'
                    f'</div>{handlers.preset_buttons([(chosen.width, chosen.height)])}',
                    f"{chosen.width}x{chosen.height}", "" if gpu is None else str(gpu))

        use_button.click(use_this, inputs=[use_choice, *plan_inputs], outputs=[use_result, use_size, use_gpu]).then(
            None, inputs=[use_size, use_gpu], outputs=None, **_js(use_size_js))

        def start_download(key: str, secret: str) -> jobs.Job:
            return handlers.start_download(runner, key, host.folders(), secret)

        download_button.click(starter("download", start_download), inputs=[download_key, token],
                              outputs=[download_jobs, download_id]).then(
            watcher("download"), outputs=[download_jobs], **_poll_kwargs()).then(
            refresh, inputs=plan_inputs, outputs=plan_outputs)
        download_cancel.click(cancel, inputs=[download_id], outputs=None)

        def start_convert(src: str, qtype: str, how: str) -> jobs.Job:
            return handlers.start_convert(runner, src, qtype, how)

        convert_button.click(starter("convert", start_convert), inputs=[convert_src, convert_type, recipe],
                             outputs=[convert_jobs, convert_id]).then(
            watcher("convert"), outputs=[convert_jobs], **_poll_kwargs()).then(
            refresh, inputs=plan_inputs, outputs=plan_outputs)
        convert_cancel.click(cancel, inputs=[convert_id], outputs=None)

        def start_compare(src: str, levels: str) -> jobs.Job:
            source = None if not src or src.startswith("(") else src
            return handlers.start_compare(runner, source, levels, os.path.join(plot_dir, f"compare-{time.time()}.png"))

        def show_compare(job_id: int | None) -> tuple[Any, Any]:
            job = runner.get(int(job_id)) if job_id is not None else None
            if job is None or job.state != jobs.DONE or job.payload is None:
                return _update(), _update()
            return handlers.table_html(handlers.COMPARE_COLUMNS, handlers.compare_rows(job.payload)), job.target

        compare_id = gr.State(None)
        compare_button.click(starter("compare", start_compare), inputs=[compare_src, compare_levels],
                             outputs=[compare_jobs, compare_id]).then(
            watcher("compare"), outputs=[compare_jobs], **_poll_kwargs()).then(
            show_compare, inputs=[compare_id], outputs=[compare_table, compare_plot])
    return tab
