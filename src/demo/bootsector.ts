/**
 * A 512-byte boot-sector guest that dirties one byte in every 4 KiB page of
 * [1 MiB, 100 MiB) forever. Migration tests stop the guest on the destination
 * and check that the pages still form the "v+1 ... v+1, v ... v" pattern: any page
 * that the migration dropped or sent stale would break it.
 *
 * The machine code is listed byte by byte with its assembly so that no assembler is
 * needed when the tests run. Check it with:
 *   objdump -D -b binary -mi8086 --adjust-vma=0x7c00 --start-address=0x7c00 --stop-address=0x7c2b
 *   objdump -D -b binary -mi386  --adjust-vma=0x7c00 --start-address=0x7c2b --stop-address=0x7c5a
 */
import { writeFileSync } from 'node:fs';

export const GUEST_DIRTY_START = 1024 * 1024;
export const GUEST_DIRTY_END = 100 * 1024 * 1024;
export const GUEST_PAGE_SIZE = 4096;
/** Written to COM1 once per completed pass over the dirty range. */
export const GUEST_PASS_MARKER = 'B';

const LOAD_ADDR = 0x7c00;

interface Insn {
  /** Address the instruction must land on; a wrong hand count fails loudly at build time. */
  at: number;
  bytes: number[];
  asm: string;
}

// Register-form and memory operands are encoded for the mode noted in each block:
// the first block runs in 16-bit real mode, the second in 32-bit protected mode.
const REAL_MODE: Insn[] = [
  { at: 0x7c00, bytes: [0xfa], asm: 'cli' },
  // BIOSes enter at either 0000:7C00 or 07C0:0000; a far jump makes CS=0 so the
  // absolute offsets below mean the same thing everywhere.
  { at: 0x7c01, bytes: [0xea, 0x06, 0x7c, 0x00, 0x00], asm: 'jmp 0x0000:0x7c06' },
  { at: 0x7c06, bytes: [0x31, 0xc0], asm: 'xor ax, ax' },
  { at: 0x7c08, bytes: [0x8e, 0xd8], asm: 'mov ds, ax' },
  { at: 0x7c0a, bytes: [0x8e, 0xd0], asm: 'mov ss, ax' },
  { at: 0x7c0c, bytes: [0xbc, 0x00, 0x7c], asm: 'mov sp, 0x7c00' },
  // Fast A20 gate (System Control Port A), so addresses >= 1 MiB do not wrap.
  { at: 0x7c0f, bytes: [0xe4, 0x92], asm: 'in al, 0x92' },
  { at: 0x7c11, bytes: [0x0c, 0x02], asm: 'or al, 0x02          ; A20 enable' },
  { at: 0x7c13, bytes: [0x24, 0xfe], asm: 'and al, 0xfe         ; bit 0 would reset the CPU' },
  { at: 0x7c15, bytes: [0xe6, 0x92], asm: 'out 0x92, al' },
  { at: 0x7c17, bytes: [0x0f, 0x01, 0x16, 0x78, 0x7c], asm: 'lgdt [0x7c78]' },
  { at: 0x7c1c, bytes: [0x0f, 0x20, 0xc0], asm: 'mov eax, cr0' },
  { at: 0x7c1f, bytes: [0x66, 0x83, 0xc8, 0x01], asm: 'or eax, 1             ; CR0.PE' },
  { at: 0x7c23, bytes: [0x0f, 0x22, 0xc0], asm: 'mov cr0, eax' },
  // The far jump loads CS from the GDT, which switches decoding to 32-bit.
  { at: 0x7c26, bytes: [0xea, 0x2b, 0x7c, 0x08, 0x00], asm: 'jmp 0x0008:0x7c2b' },
];

const PROTECTED_MODE: Insn[] = [
  { at: 0x7c2b, bytes: [0x66, 0xb8, 0x10, 0x00], asm: 'mov ax, 0x10         ; flat data selector' },
  { at: 0x7c2f, bytes: [0x8e, 0xd8], asm: 'mov ds, ax' },
  { at: 0x7c31, bytes: [0x8e, 0xc0], asm: 'mov es, ax' },
  { at: 0x7c33, bytes: [0x8e, 0xd0], asm: 'mov ss, ax' },
  { at: 0x7c35, bytes: [0x8e, 0xe0], asm: 'mov fs, ax' },
  { at: 0x7c37, bytes: [0x8e, 0xe8], asm: 'mov gs, ax' },
  { at: 0x7c39, bytes: [0xbc, 0x00, 0x7c, 0x00, 0x00], asm: 'mov esp, 0x7c00' },
  // outer:
  { at: 0x7c3e, bytes: [0xb8, 0x00, 0x00, 0x10, 0x00], asm: 'mov eax, 0x00100000  ; GUEST_DIRTY_START' },
  // inner:
  { at: 0x7c43, bytes: [0xfe, 0x00], asm: 'inc byte [eax]' },
  { at: 0x7c45, bytes: [0x05, 0x00, 0x10, 0x00, 0x00], asm: 'add eax, 0x1000' },
  { at: 0x7c4a, bytes: [0x3d, 0x00, 0x00, 0x40, 0x06], asm: 'cmp eax, 0x06400000  ; GUEST_DIRTY_END' },
  { at: 0x7c4f, bytes: [0x72, 0xf2], asm: 'jb inner             ; 0x7c43 - 0x7c51 = -14' },
  // The UART needs no setup under QEMU: a write to THR goes straight to the chardev.
  { at: 0x7c51, bytes: [0x66, 0xba, 0xf8, 0x03], asm: 'mov dx, 0x3f8        ; COM1 data' },
  { at: 0x7c55, bytes: [0xb0, 0x42], asm: "mov al, 'B'" },
  { at: 0x7c57, bytes: [0xee], asm: 'out dx, al' },
  { at: 0x7c58, bytes: [0xeb, 0xe4], asm: 'jmp outer            ; 0x7c3e - 0x7c5a = -28' },
];

// Descriptor: limit 0xFFFFF with 4 KiB granularity and base 0 gives flat 4 GiB segments.
const GDT: Insn[] = [
  { at: 0x7c60, bytes: [0, 0, 0, 0, 0, 0, 0, 0], asm: 'null descriptor' },
  { at: 0x7c68, bytes: [0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00], asm: 'selector 0x08: code, ring 0, 32-bit, base 0, 4 GiB' },
  { at: 0x7c70, bytes: [0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00], asm: 'selector 0x10: data, ring 0, writable, base 0, 4 GiB' },
  { at: 0x7c78, bytes: [0x17, 0x00, 0x60, 0x7c, 0x00, 0x00], asm: 'GDTR: limit 23, base 0x7c60' },
];

export function buildBootSector(): Buffer {
  const sector = Buffer.alloc(512);
  let end = 0;
  for (const insn of [...REAL_MODE, ...PROTECTED_MODE, ...GDT]) {
    const off = insn.at - LOAD_ADDR;
    if (off < end) {
      throw new Error(`boot sector: "${insn.asm}" at 0x${insn.at.toString(16)} overlaps the previous instruction`);
    }
    Buffer.from(insn.bytes).copy(sector, off);
    end = off + insn.bytes.length;
  }
  // Consecutive code entries must abut exactly, otherwise a length was miscounted.
  for (const block of [REAL_MODE, PROTECTED_MODE]) {
    for (let i = 1; i < block.length; i++) {
      const prev = block[i - 1]!;
      if (prev.at + prev.bytes.length !== block[i]!.at) {
        throw new Error(`boot sector: gap or overlap after "${prev.asm}"`);
      }
    }
  }
  if (end > 510) throw new Error('boot sector: code does not fit');
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

export function writeBootSector(path: string): void {
  writeFileSync(path, buildBootSector());
}

export interface DirtyInvariantResult {
  ok: boolean;
  /** The value of the pages not yet incremented in the current pass (v). */
  value: number;
  /** Index of the first page still holding v; pages before it hold v+1. */
  boundary: number;
  reason?: string;
}

/**
 * `mem` is a dump of guest-physical memory [start, GUEST_DIRTY_END). Only byte 0 of each
 * page is examined because that is the only byte the guest touches.
 */
export function checkDirtyInvariant(mem: Buffer, start: number = GUEST_DIRTY_START): DirtyInvariantResult {
  const pages = Math.ceil(mem.length / GUEST_PAGE_SIZE);
  const addr = (i: number) => '0x' + (start + i * GUEST_PAGE_SIZE).toString(16);
  if (pages === 0) return { ok: false, value: 0, boundary: 0, reason: 'empty memory dump' };

  const first = mem[0]!;
  let k = 0;
  while (k < pages && mem[k * GUEST_PAGE_SIZE] === first) k++;
  if (k === pages) {
    if (first === 0) {
      return {
        ok: false, value: 0, boundary: 0,
        reason: `all ${pages} pages are zero: the guest has not run (or its writes were lost)`,
      };
    }
    return { ok: true, value: first, boundary: 0 };
  }
  const v = mem[k * GUEST_PAGE_SIZE]!;
  if (((v + 1) & 0xff) !== first) {
    return {
      ok: false, value: v, boundary: k,
      reason: `page ${k} (${addr(k)}) = ${v} follows pages of ${first}; expected ${(first + 255) & 0xff}`,
    };
  }
  for (let i = k + 1; i < pages; i++) {
    const b = mem[i * GUEST_PAGE_SIZE]!;
    if (b !== v) {
      const what = b === first ? 'a second boundary' : 'a foreign value';
      return {
        ok: false, value: v, boundary: k,
        reason: `page ${i} (${addr(i)}) = ${b}, expected ${v} (${what}; boundary at page ${k}, ${first} before it)`,
      };
    }
  }
  return { ok: true, value: v, boundary: k };
}
