"""The SASS parser on a checked-in snippet in ``cuobjdump -sass`` format, with counts worked out by hand.

The snippet: an outer MMA loop A (0x30-0xd0: HGMMA 64x64x16 and 64x128x16, a MUFU, a 16-byte LDGSTS, a 16-bit
LDG) that nests a loop B without MMA (0x80-0xa0, holding a NOP), an mma.sync loop C (0xe0-0x100, two
HMMA.16816), and the ``BRA`` to itself that pads every kernel after its last EXIT (not a loop).
"""

import pytest
import sass_parser

SASS = """
	code for sm_90a
		Function : example_kernel
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                    /* 0x00000a00ff017b82 */
                                                                                             /* 0x000e700000000800 */
        /*0010*/                   LDGSTS.E.BYPASS.128 [R77], desc[UR16][R6.64], !P2 ;       /* 0x0000000006... */
        /*0020*/              @!P0 EXIT ;                                                    /* 0x000000000000894d */
        /*0030*/                   WARPGROUP.ARRIVE ;                                        /* 0x0000000000007... */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT ;       /* 0x0... */
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24, gsb0 ; /* 0x0... */
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                           /* 0x0... */
        /*0070*/                   MUFU.EX2 R102, R120 ;                                     /* 0x0... */
        /*0080*/                   FFMA R1, R2, R3, R4 ;                                     /* 0x0... */
        /*0090*/                   NOP ;                                                     /* 0x0... */
        /*00a0*/               @P1 BRA 0x80 ;                                                /* 0x0... */
        /*00b0*/                   LDGSTS.E.BYPASS.128 [R179], desc[UR16][R6.64], P2 ;       /* 0x0... */
        /*00c0*/                   LDG.E.U16 R5, desc[UR16][R2.64] ;                         /* 0x0... */
        /*00d0*/              @!P2 BRA 0x30 ;                                                /* 0x0... */
        /*00e0*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                     /* 0x0... */
        /*00f0*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                     /* 0x0... */
        /*0100*/               @P3 BRA 0xe0 ;                                                /* 0x0... */
        /*0110*/                   STG.E.128 desc[UR16][R2.64], R4 ;                         /* 0x0... */
        /*0120*/                   EXIT ;                                                    /* 0x0... */
        /*0130*/                   BRA 0x130;                                                /* 0x0... */
"""
PTXAS_LOG = """ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the \
function 'example_kernel'
ptxas info    : Function properties for example_kernel
    80 bytes stack frame, 88 bytes spill stores, 76 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 80 bytes cumulative stack size
"""


def test_instructions_and_loops():
    instructions = sass_parser.parse_sass(SASS)
    assert len(instructions) == 20
    assert instructions[2].predicate == "@!P0" and instructions[2].opcode == "EXIT"
    assert instructions[5].opcode == "HGMMA.64x128x16.F32.BF16"
    spans = [(instructions[a].address, instructions[b].address) for a, b in sass_parser.loops(instructions)]
    assert spans == [(0x80, 0xA0), (0x30, 0xD0), (0xE0, 0x100)]


def test_branch_back_from_after_exit_is_not_a_loop():
    """A TMA pipeline's mbarrier wait jumps out to a retry block placed after EXIT, which branches back into the
    loop: the K loop (0x10-0x50) is the loop, not the span from 0x30 to the retry's branch."""
    retry = """
        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR6+0x24000], R8 ;
        /*0020*/              @!P1 BRA 0x80 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24, gsb0 ;
        /*0040*/                   UTMALDG.2D [UR12], [UR18] ;
        /*0050*/               @P2 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR6+0x24000], R8 ;
        /*0090*/              @!P1 BRA 0x80 ;
        /*00a0*/                   BRA 0x30 ;
"""
    instructions = sass_parser.parse_sass(retry)
    spans = [(instructions[a].address, instructions[b].address) for a, b in sass_parser.loops(instructions)]
    assert spans == [(0x10, 0x50), (0x80, 0x90)]
    loop, candidates = sass_parser.hot_loop(instructions, 8)
    assert candidates == 1 and (instructions[loop.first].address, loop.instructions, loop.tma) == (0x10, 5, 1)


def test_mma_flops():
    hgmma, hmma = (sass_parser.parse_sass(SASS)[i] for i in (5, 14))
    assert sass_parser.mma_flops(hgmma) == ("wgmma", 2 * 64 * 128 * 16)
    assert sass_parser.mma_flops(hmma) == ("mma_sync", 2 * 16 * 8 * 16)
    tf32 = sass_parser.parse_sass("/*0000*/ HGMMA.64x32x8.F32.TF32 R24, gdesc[UR4], R24 ;\n"
                                  "/*0010*/ HMMA.1688.F32.TF32 R4, R8, R12, R4 ;")
    assert [sass_parser.mma_flops(inst) for inst in tf32] == [("wgmma", 2 * 64 * 32 * 8), ("mma_sync", 2 * 16 * 8 * 8)]


@pytest.mark.parametrize("warps", [4, 8])
def test_hot_loop_is_the_innermost_mma_loop_with_most_flops(warps):
    loop, candidates = sass_parser.hot_loop(sass_parser.parse_sass(SASS), warps)
    assert candidates == 2  # loops A and C hold MMAs; B does not
    assert (loop.first, loop.last) == (3, 13)  # loop A, 0x30-0xd0
    assert loop.instructions == 10  # 11 instructions, NOP excluded
    assert (loop.wgmma, loop.mma_sync, loop.mufu, loop.tma, loop.nested_loops) == (2, 0, 1, 0, 1)
    assert loop.cp_async_widths == {128: 1} and loop.ldg_widths == {16: 1} and loop.pipelined
    flops = (2 * 64 * 64 * 16 + 2 * 64 * 128 * 16) * warps // 4  # per warpgroup x warpgroups
    assert loop.mma_flops_per_cta(warps) == flops
    assert loop.issue_per_mma(warps) == pytest.approx((10 * warps / 4) / (flops / 4096))


def test_local_memory_accesses_in_the_hot_loop():
    """Spill traffic inside a loop (STL / LDL) is counted per loop; accesses outside every loop are not."""
    spilled = (SASS.replace("FFMA R1, R2, R3, R4", "STL [R1+0x4], R3").replace("LDG.E.U16 R5,", "LDL.LU R5,")
               .replace("STG.E.128 desc[UR16][R2.64], R4", "STL.128 [R1], R4"))
    loop, _ = sass_parser.hot_loop(sass_parser.parse_sass(spilled), 4)
    assert (loop.first, loop.local) == (3, 2)
    assert sass_parser.hot_loop(sass_parser.parse_sass(SASS), 4)[0].local == 0


def test_kernel_stats():
    stats = sass_parser.kernel_stats(SASS, PTXAS_LOG, 4)
    assert stats.instructions == 19 and stats.loops == 3
    assert (stats.wgmma, stats.mma_sync, stats.mufu, stats.tma) == (2, 2, 1, 0)
    assert stats.cp_async_widths == {128: 2} and stats.ldg_widths == {16: 1} and stats.stg_widths == {128: 1}
    assert (stats.spill_stores, stats.spill_loads) == (88, 76)
    assert stats.warnings == ("C7515",)


def test_without_mma_the_largest_innermost_loop_is_hot():
    no_mma = SASS.replace("HGMMA.64x64x16", "IMAD").replace("HGMMA.64x128x16", "IMAD").replace("HMMA.16816", "IMAD")
    loop, candidates = sass_parser.hot_loop(sass_parser.parse_sass(no_mma), 4)
    assert candidates == 2  # B and C: A nests B
    assert (loop.first, loop.last, loop.instructions, loop.issue_per_mma(4)) == (14, 16, 3, None)


def test_rejects_text_without_sass():
    with pytest.raises(ValueError, match="no SASS"):
        sass_parser.parse_sass("ptxas info: nothing here")
