"""Does ONNX Runtime's int8 path use this CPU's AMX (or only AVX-512 VNNI), and what does int8 buy?

Each case runs in its own process: the embedder (sentence-t5-base architecture, random weights,
built by bench/models_cpu.py) and the Ask-LLM scorer (flan-t5-small) embed / score the same
documents, int8 and fp32, with AMX allowed and with AMX denied. ONNX Runtime's kernel library
(MLAS) asks Linux for permission to use the AMX tile registers (arch_prctl
ARCH_REQ_XCOMP_PERM) when the CPU reports AMX-INT8, and takes its AMX int8 GEMM only if that
is granted; "AMX denied" installs a seccomp filter that refuses that one request, so MLAS
falls back to its AVX-512 VNNI kernels — the same build, the same process otherwise. Printed:
whether the permission was granted after loading, and docs/s (best of `--repeats`).

    .venv/bin/python bench/cpu_int8.py [--docs 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM, _XTILEDATA = 158, 0x1022, 0x1023, 18


def amx_permitted() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_uint64(0)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return False
    return bool(mask.value >> _XTILEDATA & 1)


def deny_amx() -> None:
    """A seccomp filter (x86-64) failing arch_prctl(ARCH_REQ_XCOMP_PERM, ...) with EPERM; all else allowed."""

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    ld, jeq, ret = 0x20, 0x15, 0x06
    program = (Filter * 6)(Filter(ld, 0, 0, 0), Filter(jeq, 0, 3, _SYS_ARCH_PRCTL), Filter(ld, 0, 0, 16),
                           Filter(jeq, 0, 1, _ARCH_REQ_XCOMP_PERM), Filter(ret, 0, 0, 0x00050000 | 1),
                           Filter(ret, 0, 0, 0x7FFF0000))
    prog = Prog(6, program)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


def one_case(model: str, variant: str, amx: bool, docs: int, repeats: int, threads: int) -> dict:
    if not amx:
        deny_amx()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from models_cpu import build, document_sets

    from streamfilter.models import AskLLMScorer, SentenceEmbedder

    _, folder = build(model, REPO / ".cache" / "bench-models")
    texts = document_sets(0, docs)["web mix"]
    if model.startswith("flan"):
        m = AskLLMScorer.load(folder, variant=variant, intra_op_threads=threads)
        run = lambda: m.score(texts, batch_size=32)  # noqa: E731
    else:
        m = SentenceEmbedder.load(folder, variant=variant, dtype="float16", intra_op_threads=threads)
        run = lambda: m.embed(texts, batch_size=32)  # noqa: E731
    run()
    best = min(_timed(run) for _ in range(repeats))
    return {"model": model, "variant": variant, "amx_allowed": amx, "amx_granted": amx_permitted(),
            "docs_per_s": round(len(texts) / best, 2)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        model, variant, amx = args.case.split(":")
        print(json.dumps(one_case(model, variant, amx == "1", args.docs, args.repeats, args.threads)))
        return
    flags = Path("/proc/cpuinfo").read_text()
    print("CPU flags:", " ".join(f for f in ("avx512_vnni", "amx_int8", "amx_bf16", "amx_tile") if f" {f}" in flags))
    cases = [(m, v, a) for m in ("sentence-t5-base", "flan-t5-small")
             for v, a in (("int8", "1"), ("int8", "0"), ("fp32", "1"), ("fp32", "0"))]
    results: dict[tuple, list[dict]] = {c: [] for c in cases}
    for order in (cases, cases[::-1]):  # twice, the second time reversed: drift in the load shows as spread
        for case in order:
            out = subprocess.run([sys.executable, __file__, "--case", ":".join(case), "--docs", str(args.docs),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout
            results[case].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[case][-1]), flush=True)
    print("\n| model | variant | AMX | AMX granted to the process | docs/s (two rounds) |\n|---|---|---|---|---|")
    for (model, variant, amx), rows in results.items():
        print(f"| {model} | {variant} | {'allowed' if amx == '1' else 'denied'} | "
              f"{'yes' if all(r['amx_granted'] for r in rows) else 'no'} | "
              + ", ".join(str(r["docs_per_s"]) for r in rows) + " |")


if __name__ == "__main__":
    main()
