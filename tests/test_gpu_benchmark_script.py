import pytest
"""benchmarks/gpu.py runs end to end (on the CPU at toy sizes: the script, not the figures) and
refuses a CUDA run without a GPU, so a lent GPU's minutes are not spent finding a broken script."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_every_kernel_section_writes_its_table(tmp_path):
    output = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "0",
                           "--only", "dwconv", "dcnv3", "deform_conv", "--output", str(output)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = output.read_text()
    assert markdown.strip() in done.stdout
    for heading in ("### dwconv2d vs F.conv2d", "### dcnv3 vs the grid_sample reference", "### deform_conv2d vs"):
        assert heading in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    for dtype in ("fp32", "bf16"):
        for pass_name in ("fwd", "fwd+bwd"):
            assert any(f"| {dtype} | {pass_name} |" in row for row in rows), (dtype, pass_name)
    tf32_rows = [row for row in rows if "| tf32 |" in row]   # dwconv2d's large kernels, NCHW, both passes
    assert [row.split(" | ")[:3] for row in tf32_rows] == [["| nchw 8@12x12 k7", "tf32", "fwd"],
                                                           ["| nchw 8@12x12 k7", "tf32", "fwd+bwd"]]
    assert "tf32 " in markdown.split("### dcnv3")[0].split("worst relative difference:")[1]
    dcnv3_rows = [row for row in rows if "8ch@6x6 g2" in row]
    assert len(dcnv3_rows) == 4 and all(row.endswith("x |") for row in dcnv3_rows)   # a speed-up in each
    assert "large kernel / 3x3" in markdown
    assert "Triton autotuning: none, interpreted (TRITON_INTERPRET=1)." in markdown
    for section in ("dwconv", "dcnv3", "deform_conv"):
        assert f"(section {section}: " in markdown
    # every case compared with its baseline (deform_conv's is torchvision) after the timings, within tolerance
    try:
        import torchvision  # noqa: F401
        checked_sections = 3
    except ImportError:
        checked_sections = 2
    assert markdown.count("worst relative difference: fp32 ") == checked_sections
    assert "differs from the fp32 baseline" not in markdown


def test_cuda_run_without_a_gpu_is_refused():
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # no GPU, also on a machine that has one
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "dwconv"], capture_output=True, text=True,
                          timeout=300, env=hidden)
    assert done.returncode != 0
    assert "needs an NVIDIA GPU" in done.stderr and "Nothing measured" in done.stderr


def test_the_check_after_the_timings_notes_a_wrong_kernel(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu
    import torch

    bench = gpu.Bench(torch.device("cpu"), quick=False, tiny=True, warmup=0, repeats=1)
    x = torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True)
    bench.check("exact", "bf16", lambda t: t * 3, lambda t: t * 3, [x])
    assert bench.worst_difference["bf16"] < 5e-3 and bench.notes == []   # bf16 rounding only
    bench.check("wrong gradient", "bf16", lambda t: t * 3 + (t * 0.2 - (t * 0.2).detach()), lambda t: t * 3, [x])
    assert abs(bench.worst_difference["bf16"] - 0.2 / 3) < 1e-2          # the input gradient is 3.2, not 3
    assert len(bench.notes) == 1 and bench.notes[0].startswith("wrong gradient: ours differs from the fp32 baseline")
    bench.check("raises", "bf16", lambda t: t.view(-1, 3), lambda t: t, [x])
    assert bench.notes[-1].startswith("raises: check failed:")


def test_kernel_choices_lists_each_kept_choice(monkeypatch):
    """The dwconv2d kernel kept per (pass, layer, layout), as the GPU run records it; on the CPU nothing
    is timed, so the choices are put in by hand."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu
    import torch
    from convzoo.ops.dwconv import triton as dwconv_triton

    assert gpu.kernel_choices() == []
    key = dwconv_triton.ChoiceKey("forward", (128, 56, 56), True, (128, 1, 31, 31), torch.bfloat16, "ieee", (1, 1),
                                  (15, 15, 15, 15), (1, 1), torch.device("cuda"))
    choices = {key: "band", key._replace(role="grad_weight", rows_contiguous=False): "direct",
               key._replace(dtype=torch.float32, precision="tf32"): "band"}
    monkeypatch.setattr(dwconv_triton, "_KERNEL_CHOICE", choices)
    assert gpu.kernel_choices()[2:] == ["- forward bfloat16 nchw x[128, 56, 56] k31 stride 1: band",
                                        "- forward float32 (tf32) nchw x[128, 56, 56] k31 stride 1: band",
                                        "- grad_weight bfloat16 channels_last x[128, 56, 56] k31 stride 1: direct"]
