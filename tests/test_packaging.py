"""What an install of the kernels alone pulls in."""
import subprocess
import sys

# The model layer's, the video readers' and the benchmark's dependencies, and
# our other packages: ``pip install lookwhen-kernels`` installs none of them.
NOT_CORE = {"timm", "safetensors", "decord", "av", "PIL", "matplotlib", "tqdm", "einops", "lookwhen", "bench",
            "lookwhen_bench"}


def test_the_kernels_import_nothing_but_torch_and_triton():
    # torch itself imports some of them when they are installed (tqdm): only
    # what lookwhen_kernels adds to torch's own imports counts.
    code = ("import sys, torch; before = {m.split('.')[0] for m in sys.modules}; import lookwhen_kernels as lk; "
            "lk.topk_tokens(torch.randn(2, 8), 3); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - before)))")
    added = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "triton" in added and "lookwhen_kernels" in added and not added & NOT_CORE, added & NOT_CORE
