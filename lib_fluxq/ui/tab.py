"""The Flux Quant tab: one gradio Blocks used by the WebUI (scripts/fluxq_tab.py, on_ui_tabs) and by the standalone
app (``python -m lib_fluxq ui``).

Sections, each built by its own method of ``TabBuilder``: This machine (editable, to plan for another card) ·
Recommendation · Your models · Use this · Get a model · Convert · Compare. Logic lives in handlers.py; long jobs run
in lib_fluxq.jobs threads (bounded per kind) and the page polls them with a short async generator, so no request
thread is held by a download or a conversion and generation is never blocked.

Every event has an ``api_name`` (the tests call each by name, as anyone who can reach the WebUI can): what they
receive is checked in handlers / listing, never trusted because the page offered only valid choices.
"""

from __future__ import annotations

import asyncio
import html
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import gradio as gr

from lib_fluxq import catalog, jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.ui import handlers
from lib_fluxq.ui.host import StandaloneHost

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
POLL_SECONDS = 0.3
DEFAULT_COMPARE_LEVELS = "Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,Q3_K,Q2_K,NF4"
MINE_KEPT = 50   # job ids remembered per visitor

# One runner per process (made at the first build, so a bad FLUXQ_JOB_LIMITS is reported then): jobs survive page
# reloads; every visitor sees the titles, only their own details.
_RUNNER: list[jobs.JobRunner] = []


def shared_runner() -> jobs.JobRunner:
    if not _RUNNER:
        _RUNNER.append(jobs.JobRunner())
    return _RUNNER[0]


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


def _section(title: str) -> Any:
    column = gr.Column(elem_classes=["fluxq-section"])
    with column:
        gr.Markdown(f"### {title}")
    return column


class TabBuilder:
    """Builds the tab section by section; the widgets one section's events need from another live on ``self``."""

    def __init__(self, host: StandaloneHost, runner: jobs.JobRunner) -> None:
        self.host, self.runner = host, runner
        self.detected = handlers.detect_machine(host.models_dir)
        self.listing = handlers.new_listing(host.scan_paths())
        self.plot_dir = tempfile.mkdtemp(prefix="fluxq-ui-")
        self.fields0 = handlers.machine_fields(self.detected)
        self.rescan_after: dict[str, Any] = {}   # job events whose end refreshes the page (wire_plan)

    # ------------------------------------------------------------------------------------------ the plan, shared
    def lora_mode(self) -> str | None:
        """How LoRA reaches GGUF weights with the hook as installed (ui.host: None in the standalone app)."""
        return self.host.lora_on_gguf()

    def compute(self, gpu: str, vram: float | None, ram: float | None, size: str, model: str) -> dict[str, Any]:
        plan = handlers.make_plan(self.detected, gpu, vram, ram, size, model, self.host.advisor_host)
        inventory = handlers.inventory(self.listing, plan)
        files = None
        advisor = handlers.optional("lib_fluxq.advisor")
        if inventory is not None and advisor is not None:
            files = advisor.files_from_reports(inventory.reports)
        return {"plan": plan, "inventory": inventory, "advice": handlers.advise(plan, files)}

    def refresh(self, gpu: str, vram: float | None, ram: float | None, size: str, model: str) -> tuple[Any, ...]:
        """Recommendation, models table and note, and the three file dropdowns."""
        try:
            state = self.compute(gpu, vram, ram, size, model)
        except FluxqError as exc:
            return handlers.error_html(exc), _update(), _update(), _update(), _update(), _update()
        inventory = state["inventory"]
        if inventory is None:
            rows, note = [], handlers.not_available("The model inventory", "lib_fluxq.inspect")
        else:
            rows = handlers.model_rows(inventory, handlers.module_files(self.host, self.listing),
                                       handlers.plan_ram(state["plan"]))
            folders = ", ".join(sorted({os.path.basename(p) for p in self.host.scan_paths()}))
            note = (f'<div class="fluxq-small">{len(rows)} files in {html.escape(folders)}'
                    f'{"; " + html.escape(inventory.note) if inventory.note else ""}</div>')
        transformers = handlers.transformer_choices(inventory)
        sources = handlers.convertible_choices(inventory)
        comparable = handlers.comparable_choices(inventory)
        return (handlers.recommendation_html(state["advice"], state["plan"], self.lora_mode()),
                handlers.table_html(handlers.MODEL_COLUMNS, rows, wrap=("missing parts",)), note,
                _update(choices=transformers, value=transformers[0] if transformers else None),
                _update(choices=sources, value=sources[0] if sources else None),
                _update(choices=[handlers.SYNTHETIC] + comparable))

    # ------------------------------------------------------------------------------------------------- the jobs
    def watcher(self, kind: str) -> Callable[[list[int]], AsyncIterator[str]]:
        """Polls this visitor's jobs of ``kind`` until none is running or waiting (async: holds no thread)."""
        runner = self.runner

        async def watch(mine: list[int] | None) -> AsyncIterator[str]:
            mine = list(mine or [])
            while True:
                yield handlers.jobs_html(runner, kind, mine)
                if not handlers.any_active(runner, kind, mine):
                    return
                await asyncio.sleep(POLL_SECONDS)
        watch.__name__ = f"watch_{kind}"
        return watch

    def starter(self, kind: str, start: Callable[..., jobs.Job]) -> Callable[..., tuple[str, str, list[int]]]:
        """An event that starts a job and adds it to the visitor's own (``mine``, the last input and output).

        Outputs: the section's message line (why nothing started; cleared on a start), its job list, ``mine``. The
        message has its own element: the job list is re-rendered by every watcher of the visitor's jobs, which would
        wipe a refusal shown there before anyone could read it."""
        runner = self.runner

        def run(*args: Any) -> tuple[str, str, list[int]]:
            *inputs, mine = args
            mine = list(mine or [])
            try:
                job = start(*inputs)
            except FluxqError as exc:
                return handlers.error_html(exc), handlers.jobs_html(runner, kind, mine), mine
            mine = [*mine, job.id][-MINE_KEPT:]
            return "", handlers.jobs_html(runner, kind, mine), mine
        run.__name__ = f"start_{kind}"
        return run

    def canceller(self, kind: str) -> Callable[[list[int]], str]:
        """Stops this visitor's newest running or waiting job of ``kind`` (never another visitor's)."""
        runner = self.runner

        def stop(mine: list[int] | None) -> str:
            for job_id in reversed(list(mine or [])):
                job = runner.get(job_id)
                if job is not None and job.kind == kind and job.active:
                    runner.cancel(job_id)
                    break
            return handlers.jobs_html(runner, kind, list(mine or []))
        stop.__name__ = f"cancel_{kind}"
        return stop

    # ------------------------------------------------------------------------------------------------ sections
    def title(self) -> None:
        gr.HTML('<div class="fluxq-title">Flux Quant — see your machine, get the right file, use it</div>')

    def machine_and_recommendation(self, initial: tuple[Any, ...]) -> None:
        gpu0, vram0, ram0 = self.fields0
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280, elem_classes=["fluxq-section"]):
                gr.Markdown("### This machine")
                gr.HTML(handlers.machine_html(self.detected), elem_id="fluxq_detected")
                self.gpu = gr.Textbox(label="GPU (name, to plan for another card)", value=gpu0, elem_id="fluxq_gpu")
                with gr.Row():
                    self.vram = gr.Number(label="VRAM (GB)", value=vram0, elem_id="fluxq_vram", min_width=100)
                    self.ram = gr.Number(label="RAM (GB)", value=ram0, elem_id="fluxq_ram", min_width=100)
                with gr.Row():
                    self.size = _dropdown(list(handlers.SIZE_PRESETS), label="Target size", elem_id="fluxq_size",
                                          min_width=120)
                    self.model = gr.Dropdown(choices=handlers.model_choices(), value=handlers.DEFAULT_MODEL,
                                             label="Model", elem_id="fluxq_model", min_width=160)
                with gr.Row():
                    self.plan_button = gr.Button("Plan", variant="primary", elem_id="fluxq_plan", min_width=100)
                    self.reset_button = gr.Button("Use detected values", elem_id="fluxq_reset", min_width=100)
            with gr.Column(scale=2, min_width=280, elem_classes=["fluxq-section"]):
                gr.Markdown("### Recommendation")
                self.recommendation = gr.HTML(initial[0], elem_id="fluxq_recommendation")
        self.plan_inputs = [self.gpu, self.vram, self.ram, self.size, self.model]

    def models_section(self, initial: tuple[Any, ...]) -> None:
        with _section("Your models"):
            self.models_note = gr.HTML(initial[2], elem_id="fluxq_models_note")
            self.models = gr.HTML(initial[1], elem_id="fluxq_models")
            self.rescan = gr.Button("Rescan folders", elem_id="fluxq_rescan")

    def use_section(self, choices: list[str]) -> None:
        with _section("Use this"):
            with gr.Row():
                self.use_choice = _dropdown(choices, label="Flux checkpoint (best verdict first)",
                                            elem_id="fluxq_use_choice", scale=3, min_width=200)
                use_button = gr.Button("Use this", variant="primary", elem_id="fluxq_use", scale=1, min_width=100)
            use_result = gr.HTML(elem_id="fluxq_use_result")
            use_size = gr.Textbox(visible=False, elem_id="fluxq_use_size")
            use_gpu = gr.Textbox(visible=False, elem_id="fluxq_use_gpu")

        # the size goes next to the size button "Use this" just rendered (all preset rows if not rendered yet); GPU
        # Weights into Forge's own slider, when the page has one
        use_size_js = ("(size, gpu) => { const app = typeof gradioApp === 'function' ? gradioApp() : document; "
                       "fluxqSetSize(size, app.querySelector('#fluxq_use_result .fluxq-presets')); "
                       "if (gpu) fluxqSetGpuWeights(gpu); return []; }")
        use_button.click(self.use_this, inputs=[self.use_choice, *self.plan_inputs],
                         outputs=[use_result, use_size, use_gpu], api_name="use_this").then(
            None, inputs=[use_size, use_gpu], outputs=None, **_js(use_size_js))

    def use_this(self, checkpoint: Any, *plan_args: Any) -> tuple[str, str, str]:
        if not checkpoint:
            return handlers.error_html("no Flux checkpoint found in your folders: get one below"), "", ""
        try:
            chosen_file = handlers.find_checkpoint(self.listing, checkpoint)   # before anything is opened
            *machine, model = plan_args   # GPU Weights and size for the checkpoint's own family
            state = self.compute(*machine, handlers.model_for(chosen_file.report.family, model))
            chosen = handlers.use_plan(chosen_file.real, handlers.module_files(self.host, self.listing),
                                       state["plan"], state["advice"])
            message = self.host.apply(chosen.checkpoint, chosen.modules, chosen.gpu_weights_mb)
        except FluxqError as exc:
            return handlers.error_html(exc), "", ""
        runs = getattr(chosen_file.report, "runs_on", None) or {}
        lines = chosen.message.splitlines()
        if runs:   # the family table's word on which WebUI runs this family in this format
            lines.insert(1, f"{handlers.family_title(chosen_file.report.family)} runs in: "
                            + "; ".join(f"{host}: {text}" for host, text in runs.items()))
        body = "<br>".join(html.escape(line) for line in lines)
        gpu = self.host.applied_gpu_weights_mb(chosen.gpu_weights_mb)
        get = handlers.missing_cell(chosen.missing, handlers.plan_ram(state["plan"])) if chosen.missing else ""
        return (f'<div class="fluxq-note">{body}{get}</div><div class="fluxq-note">{html.escape(message)}'
                f'</div>{handlers.preset_buttons([(chosen.width, chosen.height)])}',
                f"{chosen.width}x{chosen.height}", "" if gpu is None else str(gpu))

    def download_section(self) -> None:
        with _section("Get a model"):
            with gr.Row():
                key = gr.Dropdown(choices=handlers.catalog_choices(), value=catalog.CATALOG[0].key, label="File",
                                  elem_id="fluxq_dl_key", scale=2, min_width=200)
                token = gr.Textbox(label="Hugging Face token (only for gated repositories; empty: none is sent)",
                                   type="password", elem_id="fluxq_token", scale=1, min_width=200)
            gr.HTML(handlers.catalog_html(), elem_id="fluxq_catalog")
            with gr.Row():
                button = gr.Button("Download", variant="primary", elem_id="fluxq_dl_btn", min_width=100)
                stop = gr.Button("Stop (resumes later)", elem_id="fluxq_dl_cancel", min_width=100)
            notice = gr.HTML(elem_id="fluxq_dl_msg")
            jobs_view = gr.HTML(handlers.jobs_html(self.runner, "download"), elem_id="fluxq_dl_jobs")
            # the "Get ..." buttons next to a model's missing parts (fluxq.js): the key goes here, then the click
            with gr.Row(elem_classes=["fluxq-offscreen"]):
                part_key = gr.Textbox(elem_id="fluxq_part_key", show_label=False, container=False)
                part_button = gr.Button("Get part", elem_id="fluxq_part_btn")

        def start(key_value: Any, secret: Any) -> jobs.Job:
            return handlers.start_download(self.runner, key_value, self.host.folders(), secret,
                                           listing=self.listing)

        self.rescan_after["download"] = button.click(
            self.starter("download", start), inputs=[key, token, self.mine], outputs=[notice, jobs_view, self.mine],
            api_name="download").then(
            self.watcher("download"), inputs=[self.mine], outputs=[jobs_view], api_name="watch_download",
            **_poll_kwargs())
        self.rescan_after["download_part"] = part_button.click(
            self.starter("download", start), inputs=[part_key, token, self.mine],
            outputs=[notice, jobs_view, self.mine],
            api_name="download_part").then(
            self.watcher("download"), inputs=[self.mine], outputs=[jobs_view], api_name="watch_download_part",
            **_poll_kwargs())
        stop.click(self.canceller("download"), inputs=[self.mine], outputs=[jobs_view], api_name="stop_download")

    def convert_section(self, choices: list[str]) -> None:
        targets = handlers.convert_targets()
        with _section("Convert"):
            if not targets:
                gr.HTML(handlers.not_available("Converting", "lib_fluxq.convert"))
            with gr.Row():
                self.convert_src = _dropdown(choices, label="Source (full-precision or FP8 Flux transformer)",
                                             elem_id="fluxq_convert_src", scale=3, min_width=200)
                convert_type = _dropdown(targets, value="Q4_K" if "Q4_K" in targets else None, label="Convert to",
                                         elem_id="fluxq_convert_type", scale=1, min_width=100)
                recipe = gr.Radio(["default", "all"], value="default", label="Recipe", elem_id="fluxq_recipe",
                                  scale=1, min_width=140)
            with gr.Row():
                first = choices[0] if choices else None
                name = gr.Textbox(label="Output name (in the source's folder)", elem_id="fluxq_convert_name",
                                  placeholder=handlers.default_output_name(self.listing, first, "Q4_K"),
                                  scale=3, min_width=200)
                replace = gr.Checkbox(False, label="Replace an existing file", elem_id="fluxq_convert_replace",
                                      scale=1, min_width=160)
            with gr.Row():
                button = gr.Button("Convert", variant="primary", elem_id="fluxq_convert_btn", min_width=100)
                cancel = gr.Button("Cancel", elem_id="fluxq_convert_cancel", min_width=100)
            notice = gr.HTML(elem_id="fluxq_convert_msg")
            jobs_view = gr.HTML(handlers.jobs_html(self.runner, "convert"), elem_id="fluxq_convert_jobs")

        def suggest(src: Any, qtype: Any) -> Any:
            return _update(placeholder=handlers.default_output_name(self.listing, src, qtype))

        for trigger, api in ((self.convert_src.change, "suggest_name"), (convert_type.change, "suggest_name_type")):
            trigger(suggest, inputs=[self.convert_src, convert_type], outputs=[name], api_name=api,
                    show_progress="hidden")

        def start(src: Any, qtype: Any, how: Any, out_name: Any, replace_existing: Any) -> jobs.Job:
            source = handlers.find_convertible(self.listing, src)   # before anything is opened
            return handlers.start_convert(self.runner, source, qtype, how, out_name, bool(replace_existing),
                                          listing=self.listing)

        self.rescan_after["convert"] = button.click(
            self.starter("convert", start), inputs=[self.convert_src, convert_type, recipe, name, replace, self.mine],
            outputs=[notice, jobs_view, self.mine], api_name="convert").then(
            self.watcher("convert"), inputs=[self.mine], outputs=[jobs_view], api_name="watch_convert",
            **_poll_kwargs())
        cancel.click(self.canceller("convert"), inputs=[self.mine], outputs=[jobs_view], api_name="cancel_convert")

    def compare_section(self, choices: list[str]) -> None:
        with _section("Compare quantization levels"):
            if handlers.optional("lib_fluxq.compare") is None:
                gr.HTML(handlers.not_available("The comparison", "lib_fluxq.compare"))
            with gr.Row():
                self.compare_src = _dropdown([handlers.SYNTHETIC] + choices, label="Weights",
                                             elem_id="fluxq_compare_src", scale=2, min_width=200)
                levels = gr.Textbox(DEFAULT_COMPARE_LEVELS, label="Levels", elem_id="fluxq_compare_levels",
                                    scale=2, min_width=200)
                button = gr.Button("Compare", variant="primary", elem_id="fluxq_compare_btn", scale=1,
                                   min_width=100)
            notice = gr.HTML(elem_id="fluxq_compare_msg")
            jobs_view = gr.HTML(handlers.jobs_html(self.runner, "compare"), elem_id="fluxq_compare_jobs")
            table = gr.HTML(elem_id="fluxq_compare_table")
            plot = gr.Image(label="error vs size", type="filepath", interactive=False, elem_id="fluxq_compare_plot")

        def start(src: Any, text: Any) -> jobs.Job:
            source = None if src == handlers.SYNTHETIC else handlers.find_comparable(self.listing, src)
            plot_path = os.path.join(self.plot_dir, f"compare-{time.time_ns()}.png")
            return handlers.start_compare(self.runner, source, text, plot_path, listing=self.listing)

        def show(mine: list[int] | None) -> tuple[Any, Any]:
            """The newest of this visitor's finished comparisons."""
            for job_id in reversed(list(mine or [])):
                job = self.runner.get(job_id)
                if job is not None and job.kind == "compare" and job.state == jobs.DONE and job.payload is not None:
                    rows = handlers.compare_rows(job.payload)
                    plot_file = job.target if os.path.exists(job.target) else None
                    return handlers.table_html(handlers.COMPARE_COLUMNS, rows), plot_file
            return _update(), _update()

        button.click(self.starter("compare", start), inputs=[self.compare_src, levels, self.mine],
                     outputs=[notice, jobs_view, self.mine], api_name="compare").then(
            self.watcher("compare"), inputs=[self.mine], outputs=[jobs_view], api_name="watch_compare",
            **_poll_kwargs()).then(
            show, inputs=[self.mine], outputs=[table, plot], api_name="show_compare")

    def wire_plan(self) -> None:
        """Events that refresh the plan, the models table and the file dropdowns (after downloads and conversions
        too: their output is a new file)."""
        self.plan_outputs = [self.recommendation, self.models, self.models_note, self.use_choice, self.convert_src,
                             self.compare_src]
        for kind, event in self.rescan_after.items():
            event.then(self.refresh, inputs=self.plan_inputs, outputs=self.plan_outputs, api_name=f"rescan_{kind}")
        for trigger, api in ((self.plan_button.click, "plan"), (self.rescan.click, "rescan"),
                             (self.model.change, "plan_model"), (self.size.change, "plan_size")):
            trigger(self.refresh, inputs=self.plan_inputs, outputs=self.plan_outputs, api_name=api)
        gpu0, vram0, ram0 = self.fields0
        self.reset_button.click(lambda: (gpu0, vram0, ram0), outputs=[self.gpu, self.vram, self.ram],
                                api_name="detected_values").then(
            self.refresh, inputs=self.plan_inputs, outputs=self.plan_outputs, api_name="plan_detected")

    def build(self) -> gr.Blocks:
        initial = self.refresh(*self.fields0, handlers.SIZE_PRESETS[0], handlers.DEFAULT_MODEL)
        values = [u["value"] if isinstance(u, dict) and "value" in u else u for u in initial]
        choices = [u.get("choices", []) if isinstance(u, dict) else [] for u in initial]
        with gr.Blocks(analytics_enabled=False) as tab, gr.Column(elem_id="fluxq_root"):
            self.mine = gr.State([])   # this visitor's job ids (kept on the server, per browser session)
            self.title()
            self.machine_and_recommendation(values)
            self.models_section(values)
            self.use_section(choices[3])
            self.download_section()
            self.convert_section(choices[4])
            self.compare_section(choices[5][1:])   # without the synthetic slice it adds itself
            self.wire_plan()
        return tab


def build_tab(host: StandaloneHost, runner: jobs.JobRunner | None = None) -> gr.Blocks:
    """The tab for ``host`` (lib_fluxq.ui.host: standalone, Forge or A1111)."""
    return TabBuilder(host, runner or shared_runner()).build()
