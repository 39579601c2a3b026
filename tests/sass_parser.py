"""Static measures of a compiled kernel from its SASS (``cuobjdump -sass``) and ptxas log.

Loops come from the control flow: a branch to a lower (or equal) address closes a loop spanning
``[target, branch]``. The *hot loop* is the innermost loop that holds matrix-multiply instructions (if several
do, the one with the most MMA FLOPs per iteration; ``hot_loop_candidates`` says how many there were); in a
kernel without MMA it is the innermost loop with the most instructions. Its instruction count is the number
of SASS instructions between the loop's first instruction and its backward branch, i.e. what one warp issues
in one iteration if it executes every instruction once: an estimate that counts both sides of a branch inside
the loop and any cold path it jumps over (e.g. the slow path of a sine), and counts a nested loop once.

MMA instructions and their dense FLOPs:

* ``HGMMA.64xNxK`` (sm_90 wgmma): issued by a warpgroup (4 warps) together; ``2 * 64 * N * K`` FLOPs per
  warpgroup, e.g. ``HGMMA.64x128x16.F32.BF16`` = 262,144.
* ``HMMA.MNK`` (mma.sync), e.g. ``HMMA.16816.F32.BF16`` = m16 n8 k16: ``2 * 16 * 8 * 16`` = 4,096 FLOPs per warp;
  ``HMMA.1688`` = m16 n8 k8.

Issue per MMA of the hot loop (as a ratio of clocks; <= 1 means the tensor cores, not instruction issue,
bound the loop; an estimate assuming one CTA's warps share the SM's 4 schedulers and tensor cores)::

    issue_per_mma = (loop instructions per warp * warps / 4 issue slots per clock per SM)
                    / (MMA FLOPs of one iteration of the CTA / 4,096 dense bf16 FLOP per clock per SM, H100)

The FLOP rate is the bf16/fp16 one for every MMA (tf32 runs at half of it, so a tf32 loop is understated 2x).
"""

from __future__ import annotations

import dataclasses
import re

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")
_BRANCH_TARGET = re.compile(r"\b0x([0-9a-f]+)\b")
_HGMMA = re.compile(r"^HGMMA\.64x(\d+)x(\d+)\.")
_HMMA = re.compile(r"^HMMA\.(16)(8)(8|16)\.")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_CODE = re.compile(r"\((C\d{4})\)")  # e.g. "(C7515) Potential Performance Loss: wgmma ... serialized"
TMA_OPCODES = ("UTMALDG", "UBLKCP")  # cp.async.bulk.tensor / cp.async.bulk global -> shared
CP_ASYNC_OPCODE = "LDGSTS"             # cp.async (Ampere): global -> shared, asynchronous
ISSUE_SLOTS_PER_SM = 4
MMA_FLOP_PER_CLOCK_PER_SM = 4096       # dense bf16, H100 SXM: 989 TFLOP/s / (132 SMs x 1.83 GHz)


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str
    opcode: str       # with modifiers, e.g. "LDG.E.128"
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers ("LDG")."""
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> list[Instruction]:
    """Instructions of the (first) function in ``cuobjdump -sass`` output, in address order."""
    instructions = []
    for match in _INSTRUCTION.finditer(text):
        body = match.group(2)
        predicate = ""
        found = _PREDICATE.match(body)
        if found:
            predicate, body = found.group(0).strip(), body[found.end():]
        opcode, _, operands = body.partition(" ")
        if instructions and int(match.group(1), 16) <= instructions[-1].address:
            break  # a second function
        instructions.append(Instruction(int(match.group(1), 16), predicate, opcode, operands.strip()))
    if not instructions:
        raise ValueError("no SASS instructions found (expected cuobjdump -sass output)")
    return instructions


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """``(first index, backward branch index)`` of every loop (a branch to a lower or equal address), except a
    branch to itself (the ``BRA`` padding after the final ``EXIT``) and a branch back from code placed after an
    unconditional ``EXIT`` (e.g. the retry of an mbarrier wait that a TMA pipeline jumps out to, which returns
    into the loop it left: no loop spans the kernel's exit)."""
    index = {inst.address: i for i, inst in enumerate(instructions)}
    exits = [i for i, inst in enumerate(instructions) if inst.base == "EXIT" and not inst.predicate]
    found = []
    for i, inst in enumerate(instructions):
        if inst.base != "BRA":
            continue
        target = _BRANCH_TARGET.search(inst.operands)
        if target is None:
            continue
        address = int(target.group(1), 16)
        if address < inst.address and address in index and not any(index[address] < e < i for e in exits):
            found.append((index[address], i))
    return found


def mma_flops(inst: Instruction) -> tuple[str, int]:
    """``("wgmma", FLOPs per warpgroup)``, ``("mma_sync", FLOPs per warp)`` or ``("", 0)``."""
    shape = _HGMMA.match(inst.opcode)
    if shape:
        return "wgmma", 2 * 64 * int(shape.group(1)) * int(shape.group(2))
    shape = _HMMA.match(inst.opcode)
    if shape:
        return "mma_sync", 2 * int(shape.group(1)) * int(shape.group(2)) * int(shape.group(3))
    return "", 0


def _memory_width(inst: Instruction) -> int:
    """Bits per thread of an LDG / STG / LDGSTS: ``.128``/``.64`` suffixes, ``.U16``/``.S16`` 16, ``.U8``/``.S8``
    8, else 32."""
    for part in inst.opcode.split(".")[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def _widths(instructions, base: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for inst in instructions:
        if inst.base == base:
            width = _memory_width(inst)
            counts[width] = counts.get(width, 0) + 1
    return dict(sorted(counts.items(), reverse=True))


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """One loop: instruction indices ``[first, last]``, instructions (NOPs excluded), MMA counts and FLOPs."""

    first: int
    last: int
    instructions: int
    wgmma: int
    mma_sync: int
    wgmma_flops_per_warpgroup: int
    mma_sync_flops_per_warp: int
    mufu: int
    cp_async_widths: dict   # {bits per thread: count} of LDGSTS
    tma: int
    ldg_widths: dict
    nested_loops: int
    local: int              # local-memory accesses (STL / LDL: spills, stack arrays) in the loop

    @property
    def pipelined(self) -> bool:
        """Tiles stream through shared memory asynchronously: 16-byte cp.async or TMA in the loop."""
        return bool(self.cp_async_widths.get(128) or self.tma)

    @property
    def has_mma(self) -> bool:
        return bool(self.wgmma or self.mma_sync)

    def mma_flops_per_cta(self, warps: int) -> int:
        return self.wgmma_flops_per_warpgroup * (warps // 4) + self.mma_sync_flops_per_warp * warps

    def issue_per_mma(self, warps: int) -> float | None:
        flops = self.mma_flops_per_cta(warps)
        if not flops:
            return None
        return (self.instructions * warps / ISSUE_SLOTS_PER_SM) / (flops / MMA_FLOP_PER_CLOCK_PER_SM)


def loop_stats(instructions: list[Instruction], first: int, last: int, all_loops) -> LoopStats:
    body = [inst for inst in instructions[first:last + 1] if inst.base != "NOP"]
    kinds = [mma_flops(inst) for inst in body]
    return LoopStats(
        first=first, last=last, instructions=len(body),
        wgmma=sum(kind == "wgmma" for kind, _ in kinds), mma_sync=sum(kind == "mma_sync" for kind, _ in kinds),
        wgmma_flops_per_warpgroup=sum(flops for kind, flops in kinds if kind == "wgmma"),
        mma_sync_flops_per_warp=sum(flops for kind, flops in kinds if kind == "mma_sync"),
        mufu=sum(inst.base == "MUFU" for inst in body),
        cp_async_widths=_widths(body, CP_ASYNC_OPCODE), tma=sum(inst.base in TMA_OPCODES for inst in body),
        ldg_widths=_widths(body, "LDG"),
        nested_loops=sum(first <= a and b <= last and (a, b) != (first, last) for a, b in all_loops),
        local=sum(inst.base in ("STL", "LDL") for inst in body),
    )


def hot_loop(instructions: list[Instruction], warps: int) -> tuple[LoopStats | None, int]:
    """``(the hot loop, number of candidate loops)`` of a kernel of ``warps`` warps; see the module docstring.
    ``(None, 0)`` without loops."""
    found = loops(instructions)
    stats = [loop_stats(instructions, first, last, found) for first, last in found]
    with_mma = [s for s in stats if s.has_mma]

    def innermost(candidates):
        return [s for s in candidates if not any(o is not s and s.first <= o.first and o.last <= s.last
                                                 for o in candidates)]

    if with_mma:
        candidates = innermost(with_mma)
        return max(candidates, key=lambda s: (s.mma_flops_per_cta(warps), s.instructions)), len(candidates)
    candidates = innermost(stats)
    if not candidates:
        return None, 0
    return max(candidates, key=lambda s: s.instructions), len(candidates)


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """What the static tables report for one compiled kernel (see the module docstring)."""

    instructions: int             # in the whole kernel, NOPs excluded
    loop: LoopStats | None        # the hot loop
    hot_loop_candidates: int
    loops: int
    wgmma: int                    # in the whole kernel
    mma_sync: int
    cp_async_widths: dict         # {bits per thread: count} of LDGSTS over the whole kernel
    tma: int
    mufu: int
    ldg_widths: dict              # {bits per thread: count} over the whole kernel
    stg_widths: dict
    spill_stores: int             # bytes, from the ptxas log
    spill_loads: int
    warnings: tuple[str, ...]     # ptxas diagnostic codes, e.g. ("C7515",): wgmma serialised


def kernel_stats(sass: str, ptxas_log: str, warps: int) -> KernelStats:
    instructions = parse_sass(sass)
    body = [inst for inst in instructions if inst.base != "NOP"]
    kinds = [mma_flops(inst)[0] for inst in body]
    loop, candidates = hot_loop(instructions, warps)
    spills = _SPILLS.search(ptxas_log)
    warnings = tuple(sorted(set(_PTXAS_CODE.findall(ptxas_log))))
    return KernelStats(
        instructions=len(body), loop=loop, hot_loop_candidates=candidates, loops=len(loops(instructions)),
        wgmma=kinds.count("wgmma"), mma_sync=kinds.count("mma_sync"),
        cp_async_widths=_widths(body, CP_ASYNC_OPCODE),
        tma=sum(inst.base in TMA_OPCODES for inst in body), mufu=sum(inst.base == "MUFU" for inst in body),
        ldg_widths=_widths(body, "LDG"), stg_widths=_widths(body, "STG"),
        spill_stores=int(spills.group(1)) if spills else 0, spill_loads=int(spills.group(2)) if spills else 0,
        warnings=warnings,
    )
