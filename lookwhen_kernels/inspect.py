"""Static GPU compile report: ``python -m lookwhen_kernels.inspect``.

No GPU is needed. Every kernel is compiled by Triton for sm_90 and sm_80 at the
configurations it launches with (each op module lists them in
``compile_specs()``); the cubin is read back with ``cuobjdump`` (registers,
local memory = spills, shared memory) and ``nvdisasm`` (tensor-core
instructions: HGMMA on sm_90, HMMA on sm_80 and on sm_90 for tiles under the
warpgroup MMA's 64 rows). Exits non-zero when a kernel
fails to compile, spills, needs more shared memory than a block may have
(227 KB on sm_90, 163 KB on sm_80: such a launch fails at run time), or a
GEMM-shaped kernel misses the tensor cores.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import List, Optional

from lookwhen_kernels.ops._common import CompileSpec

OP_MODULES = (
    "score_tokens",
    "topk_tokens",
    "perturbed_topk",
    "select_windows",
    "budgets_from_scores",
    "gather_tokens",
    "gather_patch_embed",
    "nn_uniqueness",
    "frame_normalize",
    "attention",
    "static_tokens",
)

TENSOR_CORE_OPCODE = {90: "HGMMA", 80: "HMMA"}
# The most dynamic shared memory one block may opt in to, per architecture.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class Row:
    kernel: str
    arch: str
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    tensor_core_instructions: Optional[int] = None
    tensor_cores_required: bool = False
    error: Optional[str] = None

    @property
    def failure(self) -> Optional[str]:
        """Why the build fails the report, or None."""
        if self.error is not None:
            return self.error
        if self.spill_bytes:
            return "spills"
        limit = SHARED_MEMORY_LIMIT.get(int(self.arch[3:]))
        if limit is not None and self.shared_bytes is not None and self.shared_bytes > limit:
            return f"shared memory over {limit // 1024} KB"
        if self.tensor_cores_required and not self.tensor_core_instructions:
            return "no tensor cores"
        return None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _nvidia_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def collect_specs(only: Optional[List[str]] = None) -> List[CompileSpec]:
    specs: List[CompileSpec] = []
    for module_name in OP_MODULES:
        module = importlib.import_module(f"lookwhen_kernels.ops.{module_name}")
        for spec in module.compile_specs():
            if only is None or any(word in spec.name for word in only):
                specs.append(spec)
    return specs


def _aligned_pointer_attrs(spec: CompileSpec) -> dict:
    # torch allocations are 16-byte aligned and the launcher marks integer
    # arguments that are multiples of 16; telling the compiler so matches how
    # real calls are specialised and lets loads vectorise.
    names = list(spec.signature)
    return {
        (names.index(arg),): [["tt.divisibility", 16]]
        for arg, ty in spec.signature.items()
        if ty.startswith("*") or arg in spec.divisible_by_16
    }


def compile_one(spec: CompileSpec, arch: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(kernel=spec.name, arch=f"sm_{arch}", tensor_cores_required=spec.tensor_cores)
    fn = spec.fn
    while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn  # unwrap @triton.autotune / @triton.heuristics
    try:
        source = ASTSource(fn, dict(spec.signature), dict(spec.constexprs), _aligned_pointer_attrs(spec))
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as exc:  # a failed compile is a row, not a crash of the report
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return row
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run(
            [_nvidia_tool("cuobjdump"), "--dump-resource-usage", handle.name],
            check=True, capture_output=True, text=True,
        ).stdout
        sass = subprocess.run(
            [_nvidia_tool("nvdisasm"), handle.name], check=True, capture_output=True, text=True
        ).stdout
    row.registers = int(re.search(r"REG:(\d+)", usage).group(1))
    # ptxas spills into the stack frame (STACK), not LOCAL.
    row.spill_bytes = sum(int(re.search(rf"{kind}:(\d+)", usage).group(1)) for kind in ("LOCAL", "STACK"))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    row.shared_bytes = static_shared + int(compiled.metadata.shared)
    opcodes = [TENSOR_CORE_OPCODE[arch]] if arch in TENSOR_CORE_OPCODE else []
    if not spec.warpgroup_mma:
        opcodes.append(TENSOR_CORE_OPCODE[80])
    row.tensor_core_instructions = sum(len(re.findall(rf"\b{opcode}\b", sass)) for opcode in set(opcodes))
    return row


def format_table(rows: List[Row]) -> str:
    header = ("kernel", "arch", "regs", "spill B", "smem B", "TC instr", "status")
    lines = []
    for r in rows:
        tc = "-" if r.tensor_core_instructions is None else str(r.tensor_core_instructions)
        if r.tensor_cores_required:
            tc += f" ({TENSOR_CORE_OPCODE[int(r.arch[3:])]})"
        status = "ok" if r.ok else "FAIL " + r.failure
        lines.append((r.kernel, r.arch, str(r.registers or "-"), str(r.spill_bytes if r.spill_bytes is not None else "-"),
                      str(r.shared_bytes if r.shared_bytes is not None else "-"), tc, status))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def run(only: Optional[List[str]] = None) -> List[Row]:
    rows = []
    for spec in collect_specs(only):
        for arch in spec.archs:
            rows.append(compile_one(spec, arch))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lookwhen_kernels.inspect",
        description="Compile every kernel for sm_90/sm_80 and report registers, spills, "
        "shared memory and tensor-core instructions (no GPU needed).",
    )
    parser.add_argument("--only", nargs="*", help="keep kernels whose name contains one of these words")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("inspect: unset TRITON_INTERPRET (the interpreter cannot compile for a GPU)", file=sys.stderr)
        return 2
    rows = run(args.only)
    if not rows:
        print("inspect: no kernels matched", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], handle, indent=2)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} kernel builds ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
