"""benchmarks/gpu_validation.py, the prepared GPU script, run on CPU tensors with torch.cuda's statistics faked: the
rows, the budget and the markdown it writes are checked here, so that a lent GPU's few minutes are not spent on a
script that fails."""

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import gpu_validation as gv
from benchmarks.accuracy import MODELS, family_matrix
from memcalc.api import run
from memcalc.spec import TrainingSpec
from tests.conftest import has_module

SMALL = gv.GpuCase("llama small bf16-pure", MODELS["llama"], TrainingSpec(precision="bf16-pure", seq_len=64))
# The second case of a run, after SMALL: the summary's two rows (a second SMALL repeated the same step, 2 s; this 0.3 s)
TINY = gv.GpuCase("llama tiny bf16-pure", {**MODELS["llama"], "hidden_size": 64, "intermediate_size": 128,
                                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                            "vocab_size": 256}, TrainingSpec(precision="bf16-pure", seq_len=16))


def test_rows_and_markdown_with_faked_statistics(fake_cuda, tmp_path):
    env, rows = gv.validate([SMALL, TINY], "cpu", budget_s=600)
    row = rows[0]
    assert row.failure == ""
    # FakeCuda's script: memory_stats() peaks over the three phases (the last reset count is 4)
    assert (row.requested_bytes, row.allocated_bytes, row.reserved_bytes) == (3600, 4000, 8000)
    assert row.retries == 1 and row.ooms == 0
    # the replay of the step's own allocations ran; the estimate is memcalc's for the same run
    assert row.replayed_reserved_bytes is not None and row.replayed_reserved_bytes > 0
    assert row.estimate_bytes is not None and row.estimate_bytes > 0
    assert env["device"] == "Fake GPU" and env["cuda_context"].startswith("1,073,741,824 B")
    text = gv.markdown(env, rows)
    assert "| llama small bf16-pure |" in text and "Fake GPU" in text
    assert "estimate + workspaces (+ left by earlier) vs requested: 2 rows" in text
    # on CPU tensors no card is known: no cuBLAS workspace is added to the estimate, nothing is read as held
    assert row.workspace_bytes == 0 and row.allocated_error == row.pct(row.estimate_bytes, row.requested_bytes)
    # each phase's peak beside the estimate's (the measured: FakeCuda's allocated peak of each phase)
    assert set(row.estimate_phase_bytes) == {"forward", "backward", "optimizer_step"}
    assert max(row.measured_phase_bytes.values()) == row.allocated_bytes
    assert "Each phase's peak, estimate / measured" in text and f"| {row.label} | " in text.split("Each phase")[1]


def test_budget_and_failures_are_rows(fake_cuda):
    broken = gv.GpuCase("no such preset", "no-such-model", TrainingSpec())
    _env, rows = gv.validate([broken], "cpu", budget_s=600)
    assert rows[0].failure.startswith("ModelNotFoundError")  # a row saying what failed; the script goes on
    _env, rows = gv.validate([SMALL], "cpu", budget_s=0)
    assert rows[0].failure == "not run: the 0 s budget was spent"


def test_the_prepared_cases_resolve():
    """Every configuration the GPU run will try is one memcalc estimates (a typo would cost device time); the compiled
    and the activation-offloaded ones, whose estimates trace the step at full size for a while (their estimates are
    tests/test_compile.py's and tests/test_activation_offload.py's), are resolved without estimating."""
    from memcalc.api import run

    for case in gv.cases():
        _config, model = gv._config(case)
        if not case.spec.compile and case.spec.activation_offload.value == "none":
            assert run(model, case.spec).per_gpu.peak_bytes > 0
    assert {case.library for case in gv.cases()} == {"", "compile", "fp8", "liger"}
    # the families part (opt-in): the CPU families matrix's quarter, each a config memcalc builds a model from
    # (their estimates, traced for the unruled families, are not made here: benchmarks/accuracy.py --part families
    # makes them all)
    families = gv.cases(parts=("families",))
    assert len(families) == len(family_matrix(quick=True)) and all(isinstance(c.model, dict) for c in families)
    for case in families:
        gv._config(case)
    assert [case.library for case in gv.cases(parts=("liger",))] == ["liger"]
    every = [case.label for case in gv.cases(parts=gv.PARTS)]  # --rerender finds each row's case by its label
    assert len(set(every)) == len(every)
    assert not any(isinstance(case.model, dict) for case in gv.cases(parts=("presets", "compile")))
    # the small models run before anything compiled (whose Inductor state outlives its configuration), Liger last
    libraries = [case.library for case in gv.cases()]
    assert libraries.index("compile") > max(i for i, case in enumerate(gv.cases()) if isinstance(case.model, dict))
    assert libraries[-1] == "liger"


@pytest.mark.parametrize(("library", "spec", "package"), [
    ("fp8", TrainingSpec(precision="bf16-pure", seq_len=64, fp8="tensorwise"), "torchao"),
    ("liger", TrainingSpec(precision="bf16-pure", seq_len=64, loss="fused-linear"), "liger_kernel"),
])
def test_a_library_missing_on_the_gpu_machine_is_a_row(fake_cuda, library, spec, package):
    if has_module(package):
        pytest.skip(f"{package} is installed here")
    _env, rows = gv.validate([gv.GpuCase(f"small {library}", MODELS["llama"], spec, library)], "cpu", budget_s=600)
    assert rows[0].estimate_bytes and rows[0].failure.startswith("ModuleNotFoundError") and package in rows[0].failure


def test_no_gpu_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gv.main(["--out", str(out)]) == 1
    assert not out.exists() and "no CUDA GPU" in capsys.readouterr().err


def test_a_case_past_its_limit_is_a_row_and_the_rows_are_written_as_they_come(fake_cuda, tmp_path):
    import gzip
    import json

    seen = []
    _env, rows = gv.validate([SMALL], "cpu", budget_s=600, case_limit_s=0.001,
                             after_each=lambda _env, rows: seen.append(len(rows)))
    assert rows[0].failure.startswith("CaseTimeout") and seen == [1]
    # the measured step's allocations are kept by label, appended to the raw folder once written
    events: dict[str, list] = {}
    _env, rows = gv.validate([SMALL], "cpu", budget_s=600, events=events)
    assert rows[0].failure == "" and events[SMALL.label][0][0] == 1  # (ALLOC, key, bytes) first
    count = len(events[SMALL.label])
    gv._write_raw(tmp_path, _env, rows, [], events)
    assert not events  # (each case's events are written once)
    with gzip.open(tmp_path / "events.jsonl.gz", "rt") as handle:
        lines = handle.read().splitlines()
    assert [json.loads(line)["label"] for line in lines] == [SMALL.label]
    assert len(json.loads(lines[0])["events"]) == count
    assert json.loads((tmp_path / "rows.json").read_text())["rows"][0]["label"] == SMALL.label


def test_cli_checks_record_the_exit_code_and_the_line(monkeypatch):
    """The GPU run's command-line checks record each command's exit code and output (here a command that needs no torch:
    an unknown model, exit 3 and one line)."""
    monkeypatch.setattr(gv, "CLI_CHECKS", (("unknown model", ["no-such-model-xyz"]),))
    [check] = gv.cli_checks()
    assert check.exit_code == 3 and "unknown model 'no-such-model-xyz'" in check.stderr
    assert check.stderr.count("\n") == 1
    text = gv.markdown({}, [], [check])
    assert "`memcalc no-such-model-xyz` (unknown model): exit 3" in text


def test_the_kept_h200_run_against_todays_estimate():
    """The H200 run kept in benchmarks/gpu-runs/2026-12-04-h200 (measured 2026-12-04) re-rendered with this memcalc's
    estimates: every --verify row and compiled row within the 1% target of the GPU's requested peak (with the card's
    cuBLAS workspaces and what earlier rows left), the float8 rows above (+5.65%: Triton's fused casts keep less);
    the rows the harness mis-ran shown as such; the command line's checks exit 0 and 6 (does not fit)."""

    folder = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu-runs" / "2026-12-04-h200"
    env, rows, checks, _contexts = gv.rerender(folder, folder / "run2", replays=False)
    assert env["device"] == "NVIDIA H200" and env["driver"] == "580.159.04"
    faulted = [r for r in rows if r.failure]
    assert {r.label.split()[0] for r in faulted} == {"llama", "qwen2", "gpt2", "llama-3.2-1b"}
    assert all(r.allocated_error is None for r in faulted)
    for r in rows:
        if r.allocated_error is None:
            continue
        if " fp8 " in r.label:
            assert 5 < r.allocated_error < 6, r.label
        else:
            assert abs(r.allocated_error) <= gv.TARGET_ALLOCATED_PCT, r.label
    assert sum(r.allocated_error is not None for r in rows) == 45
    assert [c.exit_code for c in checks] == [0, 6]
    text = gv.markdown(env, rows, checks)
    assert "45 rows" in text and "43 within the 1% target" in text


def test_unknown_parts_are_one_line_and_exit_2(capsys):
    assert gv.main(["--parts", "presets,familes", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ("gpu_validation: unknown --parts familes; known: presets, matrix, "
                                              "families, compile, fp8, liger")


def test_history_summary_names_what_was_live_at_the_peak_and_the_end():
    """A device trace written by hand in torch.cuda.memory._snapshot()'s shape: 1,000 B live before it, then A (100)
    and B (50) allocated, A freed, C (30) allocated. Allocated runs 1,100, 1,150, 1,050, 1,080: the peak is 1,150
    with A and B live; at the end B and C are; a free_requested event (a free still waiting on a stream) is not a
    free yet."""
    def frames(name):  # (the dispatch machinery's frames are left out of the stacks)
        return [{"filename": "/x/site-packages/torch/_ops.py", "line": 865, "name": "__call__"},
                {"filename": "/work/memcalc/measure/tracker.py", "line": 355, "name": "__torch_dispatch__"},
                {"filename": f"/x/site-packages/transformers/{name}.py", "line": 7, "name": name},
                {"filename": "/work/memcalc/measure/step.py", "line": 9, "name": "one_step"}]

    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": frames("mlp")},
             {"action": "alloc", "addr": 2, "size": 50, "frames": frames("attention")},
             {"action": "free_requested", "addr": 1, "size": 100, "frames": []},
             {"action": "free_completed", "addr": 1, "size": 100, "frames": []},
             {"action": "alloc", "addr": 3, "size": 30, "frames": frames("mlp")}]
    summary = gv.history_summary({"device_traces": [trace]}, allocated_at_start=1000)
    assert (summary["peak_allocated"], summary["end_allocated"], summary["events"]) == (1150, 1080, 4)
    mlp = "transformers/mlp.py:7 mlp < memcalc/measure/step.py:9 one_step"
    attention = "transformers/attention.py:7 attention < memcalc/measure/step.py:9 one_step"
    assert summary["live_at_peak"] == [{"bytes": 100, "blocks": 1, "stack": mlp},
                                       {"bytes": 50, "blocks": 1, "stack": attention}]
    # the events around the peak: up to three before the one reaching it, and the one after
    assert [(e["action"], e["bytes"]) for e in summary["around_peak"]] == [("alloc", 100), ("alloc", 50),
                                                                         ("free_completed", 100)]
    assert summary["around_peak"][1]["stack"] == attention
    assert summary["peak_index"] == 1 and [event[:3] for event in summary["trace"]] == [
        ("alloc", 1, 100), ("alloc", 2, 50), ("free_completed", 1, 100), ("alloc", 3, 30)]
    assert gv.history_summary({"device_traces": [trace]}, 1000, whole_up_to=3)["trace"] == []
    # with the tracker's booked addresses (A's and C's): B's allocation is one no tracked tensor owns
    assert gv.history_summary({"device_traces": [trace]}, 1000, booked={1, 3})["unbooked"] == [
        {"bytes": 50, "allocations": 1, "stack": attention}]
    assert summary["unbooked"] == []  # (without the booked addresses nothing is judged)
    assert summary["live_at_end"] == [{"bytes": 50, "blocks": 1, "stack": attention},
                                      {"bytes": 30, "blocks": 1, "stack": mlp}]


def test_context_readings_render_by_loading_and_moment():
    text = "\n".join(gv.context_markdown({"LAZY": {"first kernel": 2**20, "after a step": 3 * 2**20},
                                          "EAGER": {"failure": "exit 1: no GPU"}}))
    assert "| LAZY | 1,048,576 B (1 MiB) | 3,145,728 B (3 MiB) |  |" in text
    assert "| EAGER | - | - | exit 1: no GPU |" in text
    assert gv.context_markdown({}) == []


def test_with_run_keeps_that_runs_own_estimates(tmp_path):
    """--with-run: another run's rows as a section of their own, each estimate as that run computed it (a traced
    family's estimate, and Falcon's rule, depend on the GPU machine's transformers): here a row whose label is a
    prepared case keeps the run's 1,000 B instead of today's estimate."""
    import json

    label = gv.cases(parts=("presets",))[0].label
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {"device": "Fake GPU", "transformers": "5.17.0"}
    row = {"label": label, "estimate_bytes": 1000, "requested_bytes": 1100, "estimate_phase": "backward"}
    (run_dir / "rows.json").write_text(json.dumps({"env": env, "rows": [row], "cli": []}))
    _env, rows, _checks, contexts = gv.rerender(run_dir, recompute=False)
    assert rows[0].estimate_bytes == 1000 and contexts == {}
    first = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu-runs" / "2026-12-04-h200"
    out = tmp_path / "gpu.md"
    assert gv.main(["--rerender", str(first), "--cli-from", str(first / "run2"), "--with-run", str(run_dir),
                    "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(gv.TITLE)
    assert "## run: the estimates as that run computed them (on the GPU machine, transformers 5.17.0)" in text
    assert f"| {label} | 0.000 |" in text.split("## run:")[1]  # (1,000 B in GiB)


RUNS = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu-runs"


def _table_errors(rows) -> dict[str, float]:
    return {r.label: r.allocated_error for r in rows if r.allocated_error is not None}


def test_the_second_h200_run_against_todays_rules():
    """benchmarks/gpu-runs/2026-12-04-h200-b (measured 2026-12-04, harness 3): the families matrix's quarter on the
    H200. Its estimates, computed then, were low by 0.6% to 2.6% of the card's requested peak (cuBLAS workspaces
    included) in every checkpointed cell whose attention keeps the s^2 scores (eager, or sdpa's math path for fp32
    with grouped heads): CUDA's softmax backward temporary (cuda_semantics.softmax_backward_like_cuda). Today's hand
    rules, recomputed for those cells, are within the 1% target, over where not exact. (Falcon's rule follows the
    installed transformers, 5.25 here against the GPU machine's 5.17, and the traced families trace this machine's
    code: those cells are checked in the third run, below, as the GPU machine computed them.)"""
    from benchmarks.accuracy import HAND_RULED

    _env, rows, _checks, _contexts = gv.rerender(RUNS / "2026-12-04-h200-b", recompute=False, replays=False)
    then = _table_errors(rows)
    low_then = {label for label, error in then.items() if error < -0.5 and label.startswith("family ")}
    assert len(low_then) == 27
    assert all(" ckpt=full " in label and (" eager " in label or " fp32 " in label) for label in low_then)
    # (beside them one preset row: Liger's fused linear cross-entropy alone, -0.55%, its peak in the backward where
    # the estimate's is in the forward: left open)
    liger = "llama-3.2-1b bf16-pure Liger fused-linear b4xs1024"
    assert {label for label, error in then.items() if error < -0.5} - low_then == {liger}
    # ... which was the tied head's gradient, returned by the fused loss's backward and held in autograd's input
    # buffer through the backward (memcalc.engine, the head's gradient), as an unfused head's: now 0.11% low
    by_label = {case.label: case for case in gv.cases(parts=gv.PARTS)}
    row = next(r for r in rows if r.label == liger)
    _config, model = gv._config(by_label[liger])
    row.estimate_bytes = run(model, by_label[liger].spec).per_gpu.step_peak().bytes
    assert -0.12 < row.allocated_error < -0.10
    assert min(then.values()) < -2.5
    checked = 0
    for row in rows:
        family = row.label.split()[1] if row.label.startswith("family ") else ""
        if row.label not in low_then or family not in HAND_RULED or family == "falcon":
            continue
        _config, model = gv._config(by_label[row.label])
        row.estimate_bytes = run(model, by_label[row.label].spec).per_gpu.step_peak().bytes
        assert -0.05 < row.allocated_error <= gv.TARGET_ALLOCATED_PCT + 0.2, (row.label, row.allocated_error)
        checked += 1
    assert checked >= 10


def test_the_third_h200_run_as_the_gpu_machine_computed_it():
    """benchmarks/gpu-runs/2026-12-04-h200-c (measured 2026-12-04 with the softmax temporary counted, estimates
    computed on the GPU machine under its transformers 5.17): the families matrix's quarter, hand-ruled and traced.
    Every row within the 1% target but: DeepSeek-V2's eager checkpointed cells, over (+0.6% to +1.2%; today's rule,
    recomputed, within 0.3%); and one row
    1.18% low, Qwen2-MoE fp32 checkpointed, whose step was the process's first to run a biased Linear in a
    checkpointed recomputation: 1 MiB the allocator keeps from then on for autograd's thread (the harness reads what
    earlier rows left as held; the same 1 MiB in run b was held before that row, which was within 0.1%). GPT-J has no
    sdpa path in transformers 5.17 (a row saying so); the eager presets' --reserved trace hit torch 2.11's refusal to
    register a kernel twice (fixed after the run: tests/test_cuda_semantics.py)."""
    env, rows, _checks, _contexts = gv.rerender(RUNS / "2026-12-04-h200-c", recompute=False, replays=False)
    assert env["device"] == "NVIDIA H200" and env["transformers"] == "5.17.0" and env["harness"] == "3"
    errors = _table_errors(rows)
    assert len(errors) == 96
    failed = {r.label.split()[1] if r.label.startswith("family ") else r.label for r in rows if r.failure}
    assert failed == {"gptj", "llama-3.2-1b bf16-pure attn=eager b2xs1024",
                      "llama-3.2-1b bf16-pure attn=eager ckpt=full b4xs1024",
                      "llama-3.2-1b bf16-pure attn=eager ckpt=full b1xs8192"}
    beyond = {label: error for label, error in errors.items() if abs(error) > gv.TARGET_ALLOCATED_PCT}
    assert set(beyond) == {"family deepseek_v2 fp32 adamw-foreach eager ckpt=full b2xs256",
                           "family deepseek_v2 amp-bf16 adamw-foreach eager ckpt=full b2xs256",
                           "family qwen2_moe fp32 adamw-foreach sdpa ckpt=full b2xs256"}, beyond
    assert -1.2 < beyond["family qwen2_moe fp32 adamw-foreach sdpa ckpt=full b2xs256"] < -1.1
    low = [label for label, error in errors.items() if error < -0.1]
    assert sorted(low) == ["family qwen2_moe fp32 adamw-foreach sdpa ckpt=full b2xs256",
                           "qwen2 bf16-pure adamw-foreach eager ckpt=none b2xs256"]  # (the 1 MiB, forward's thread)
    # DeepSeek-V2's rule since: what its layer made after attention released by softmax's backward (the dense first
    # layer's turn, where the traced step peaks): within the target, over
    by_label = {case.label: case for case in gv.cases(parts=gv.PARTS)}
    for row in rows:
        if row.label.startswith("family deepseek_v2 ") and " eager " in row.label:
            _config, model = gv._config(by_label[row.label])
            row.estimate_bytes = run(model, by_label[row.label].spec).per_gpu.step_peak().bytes
            assert -0.01 < row.allocated_error < 0.3, (row.label, row.allocated_error)


def test_the_cuda_context_a_training_process_holds():
    """The readings fit.MEASURED_CUDA_CONTEXTS cites (--context in run b, each in a fresh process; the harness's own
    process after its rows in the history run): lazy module loading grows the context as kernels are first
    launched; eager loading holds more from the start."""
    import json

    from memcalc.fit import MEASURED_CUDA_CONTEXTS

    readings = json.loads((RUNS / "2026-12-04-h200-b" / "rows.json").read_text())["context"]
    lazy, eager = readings["LAZY"], readings["EAGER"]
    assert list(lazy.values()) == [648_871_936, 785_186_816, 804_061_184]
    assert list(eager.values()) == [1_319_960_576, 1_905_065_984, 1_955_397_632]
    env = json.loads((RUNS / "2026-12-04-h200-b" / "history" / "rows.json").read_text())["env"]
    assert env["cuda_context_after_run"].startswith("806,158,336 B")
    assert MEASURED_CUDA_CONTEXTS["9.0"][0] == 806_158_336 == max(*lazy.values(), 806_158_336)


def test_the_eager_8192_token_row_on_the_h200():
    """benchmarks/gpu-runs/2026-12-04-h200-d/eager-s8192 (measured 2026-12-04, third session): Llama-3.2-1B bf16 with
    eager attention and full checkpointing at 1 x 8192, the row the second session's registration fault stopped. The
    estimate (the softmax backward's temporary counted) is the requested peak. The GPU reserved 50.86 GiB, five 8 GiB
    segments where memcalc's replay then held four (-16%): its new segments lay above the earlier ones, where the
    H200 put them below (the snapshot's address order), and the allocator takes the lower of two cached blocks of one
    size. Replayed with segments placed as the GPU placed them, the trace --reserved makes of this row (kept beside it,
    benchmarks/replay_vs_gpu_sequence.py --save) holds what the GPU held, within 0.3%."""
    from benchmarks import segment_order

    env, rows, _checks, _contexts = gv.rerender(RUNS / "2026-12-04-h200-d" / "eager-s8192", recompute=False)
    assert env["device"] == "NVIDIA H200" and env["harness"] == "3"
    [row] = rows
    assert row.label == "llama-3.2-1b bf16-pure attn=eager ckpt=full b1xs8192" and not row.failure
    assert abs(row.allocated_error) < 0.01
    # the table's replay of the GPU's tracked allocations (no kernel's scratch in them), by this memcalc: 8 GiB above
    # the 34.71 GiB the run's replay held with segments placed upward
    assert row.replayed_reserved_bytes == 37_272_682_496 + 8 * 2**30
    assert [size for size, _allocated in row.segments[:7]] == [8 * 2**30] * 5 + [4 * 2**30] * 2  # (by address)
    [kept] = segment_order.kept_rows(run="2026-12-04-h200-d/eager-s8192")
    assert kept["reserved"] == row.reserved_bytes == 54_609_838_080
    below = segment_order.replayed(kept["trace"], row.label, row.workspace_bytes, kept["held"], segments_below=True)
    above = segment_order.replayed(kept["trace"], row.label, row.workspace_bytes, kept["held"], segments_below=False)
    assert -0.3 < 100 * (below / row.reserved_bytes - 1) < 0
    assert above == 45_862_617_088  # what --reserved predicted on the GPU machine (rows.json): -16%
    assert above + 8 * 2**30 == below == row.predicted_reserved_bytes  # (the table's --reserved, from the kept trace)


def test_the_gpus_segment_placement_against_the_kept_rows():
    """Every kept full-size row's tracked allocations replayed with the H200's placement (each new segment below the
    earlier ones) and with the upward one memcalc assumed before (benchmarks/segment_order.py): where the two differ
    by more than 0.1%, the GPU's placement is the one that holds what the GPU held. The 4 x 1024-token eager row of
    run b's allocator history is reproduced within one 2 MiB segment (the one the 1 MiB cuBLASLt workspaces the
    process held make), where the upward placement was 12.7% over."""
    from benchmarks import segment_order

    differ = {}
    for kept in segment_order.kept_rows(min_reserved=segment_order.LARGE):
        below, above = (segment_order.replayed(kept["events"], kept["label"], kept["workspace"], kept["held"], flag)
                        for flag in (True, False))
        if abs(below - above) > kept["reserved"] / 1000:
            differ[kept["label"]] = (below, above, kept["reserved"])
    assert set(differ) == {"llama-3.2-1b bf16-pure attn=eager ckpt=full b4xs1024",
                           "llama-3.2-1b bf16-pure attn=eager ckpt=full b1xs8192"}
    for below, above, reserved in differ.values():
        assert abs(below - reserved) < abs(above - reserved)
    below, above, reserved = differ["llama-3.2-1b bf16-pure attn=eager ckpt=full b4xs1024"]
    assert below - reserved == 2 * 2**20 and reserved == 16_640_901_120 and 12.6 < 100 * (above / reserved - 1) < 12.7


def test_nccl_readings_render_each_group_against_the_part_made_at_init():
    """--nccl's table with readings as sgl-project/sglang#35538 published them (an RTX 3060: 388 MiB per one-rank
    group, 10 MiB with NCCL_MAX_NCHANNELS=1), in MiB above a first-kernel context of 114 MiB: memcalc.nccl's part made
    at init, (2 + 3 x 64) x 2 = 388 MiB and (2 + 3) x 2 = 10 MiB, reads +0.0%; the script is valid Python."""
    import ast

    mib = 2**20
    readings = {"as NCCL chooses": {"first kernel": 114 * mib, "default group and an all-reduce": 584 * mib,
                                    "one-rank group 1 and an all-reduce": 972 * mib,
                                    "one-rank group 2 and an all-reduce": 1360 * mib, "nccl": "2.28.9"},
                "NCCL_MAX_NCHANNELS=1": {"failure": "exit 1: no GPU"}}
    text = "\n".join(gv.nccl_markdown(readings))
    assert "| as NCCL chooses | 2.28.9 | 114 MiB | 584 MiB | 388 MiB | 388 MiB | 388 MiB | +0.0% |  |" in text
    assert "| NCCL_MAX_NCHANNELS=1 | - | - | - | - | - | 10 MiB | - | exit 1: no GPU |" in text
    assert gv.nccl_markdown({}) == []
    ast.parse(gv._NCCL)


def test_placement_readings_say_whether_each_new_segment_lay_below_the_last():
    """--placement's table from addresses written by hand: large tensors each a segment of their own; 4 MiB tensors
    five to a 20 MiB segment, 1 MiB tensors two to a 2 MiB one, so a segment starts where a tensor is not within the
    previous one's span. Decreasing starts read "yes" (memcalc.allocator's placement), increasing ones "no"; a failed
    reading says why; the script is valid Python."""
    import ast

    ast.parse(gv._PLACEMENT)
    base, mib = 0x7F0000000000, 2**20
    down = {"large": [base - i * 2**31 for i in range(5)],
            "20 MiB segments": [base - 2**33 - (i // 5) * 40 * mib + (i % 5) * 4 * mib for i in range(15)],
            "2 MiB segments": [base - 2**34 + (i // 2) * 4 * mib + (i % 2) * mib for i in range(6)]}
    lines = gv.placement_markdown({"default": down})
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    assert rows["large"][1:3] == ["5", "yes"]
    assert rows["20 MiB segments"][1:3] == ["3", "yes"]
    assert rows["2 MiB segments"][1:3] == ["3", "no"]  # (upward: each new 2 MiB segment above the last)
    assert "ran past" in "\n".join(gv.placement_markdown({"default": {"failure": "ran past its 60 s limit"}}))
    assert gv.placement_markdown({}) == []
