"""eBPF by hand: an instruction encoder with labels, and the bpf(2) calls the proxy's kernel relays need.

There is no clang or bpftool here, so programs are written as lists of instructions (one function per
instruction kind, each giving the 8 bytes of a `struct bpf_insn`) and loaded with the bpf(2) syscall
through ctypes; the verifier's log is kept so a rejection says why. Numbers come from
include/uapi/linux/bpf.h; x86-64 only (another architecture is refused, not guessed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

_SYS_BPF = {"x86_64": 321}  # the bpf(2) syscall number

# commands
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_LINK_CREATE = 5, 8, 28
# map, program and attach types
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKHASH = 1, 18
BPF_PROG_TYPE_SOCK_OPS, BPF_PROG_TYPE_SK_SKB, BPF_PROG_TYPE_SK_MSG = 13, 14, 16
BPF_CGROUP_SOCK_OPS, BPF_SK_SKB_STREAM_VERDICT, BPF_SK_MSG_VERDICT = 3, 5, 7
BPF_ANY, BPF_NOEXIST = 0, 1
BPF_F_INGRESS = 1
# helpers
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_get_socket_cookie = 46
BPF_FUNC_sock_hash_update = 70
BPF_FUNC_msg_pull_data = 63
BPF_FUNC_msg_redirect_hash = 71
BPF_FUNC_sk_redirect_hash = 72
BPF_FUNC_msg_push_data = 90
SK_DROP, SK_PASS = 0, 1

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)


# -- the instruction encoder -----------------------------------------------------------------------------
# struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }, little-endian (x86-64).

def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One 8-byte BPF instruction."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov64_reg(dst: int, src: int) -> bytes:
    return insn(0xBF, dst, src)  # BPF_ALU64 | BPF_MOV | BPF_X


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def add64_imm(dst: int, imm: int) -> bytes:
    return insn(0x07, dst, imm=imm)  # BPF_ALU64 | BPF_ADD | BPF_K


def load32(dst: int, src: int, off: int) -> bytes:
    """dst = *(u32 *)(src + off)"""
    return insn(0x61, dst, src, off)  # BPF_LDX | BPF_MEM | BPF_W


def rsh64_imm(dst: int, imm: int) -> bytes:
    return insn(0x77, dst, imm=imm)  # BPF_ALU64 | BPF_RSH | BPF_K


def add64_reg(dst: int, src: int) -> bytes:
    return insn(0x0F, dst, src)  # BPF_ALU64 | BPF_ADD | BPF_X


def store8(dst: int, off: int, src: int) -> bytes:
    """*(u8 *)(dst + off) = src"""
    return insn(0x73, dst, src, off)  # BPF_STX | BPF_MEM | BPF_B


def load64(dst: int, src: int, off: int) -> bytes:
    """dst = *(u64 *)(src + off)"""
    return insn(0x79, dst, src, off)  # BPF_LDX | BPF_MEM | BPF_DW


def store32(dst: int, off: int, src: int) -> bytes:
    """*(u32 *)(dst + off) = src"""
    return insn(0x63, dst, src, off)  # BPF_STX | BPF_MEM | BPF_W


def store64(dst: int, off: int, src: int) -> bytes:
    """*(u64 *)(dst + off) = src"""
    return insn(0x7B, dst, src, off)  # BPF_STX | BPF_MEM | BPF_DW


def load_map_fd(dst: int, map_fd: int) -> bytes:
    """dst = the map behind map_fd: a 16-byte ld_imm64 the loader rewrites (src_reg = BPF_PSEUDO_MAP_FD)."""
    return insn(0x18, dst, 1, imm=map_fd) + insn(0)  # BPF_LD | BPF_IMM | BPF_DW


def call(helper: int) -> bytes:
    return insn(0x85, imm=helper)  # BPF_JMP | BPF_CALL


def exit_() -> bytes:
    return insn(0x95)  # BPF_JMP | BPF_EXIT


class Jump:
    """A jump to a label, resolved by `assemble`: `if dst <op> imm goto label`, or with `src` a register
    instead of imm (unsigned comparisons); `Jump.always(label)` jumps unconditionally."""

    OPS = {"==": 0x15, "!=": 0x55, ">": 0x25, "always": 0x05}  # BPF_JMP | BPF_JEQ, JNE, JGT (| BPF_K), JA

    def __init__(self, dst: int, op: str, imm: int, label: str, src: int | None = None):
        self.code = self.OPS[op] | (0x08 if src is not None else 0)  # BPF_X: compare with a register
        self.dst, self.src, self.imm, self.label = dst, src or 0, imm, label

    @classmethod
    def always(cls, label: str) -> Jump:
        return cls(0, "always", 0, label)


def assemble(*parts) -> bytes:
    """Instructions (bytes), `Jump`s and labels (str) -> the program; a jump's offset counts instructions."""
    at, pos = {}, 0
    for part in parts:
        if isinstance(part, str):
            at[part] = pos
        else:
            pos += 1 if isinstance(part, Jump) else len(part) // 8
    out, pos = [], 0
    for part in parts:
        if isinstance(part, Jump):
            out.append(insn(part.code, part.dst, part.src, off=at[part.label] - pos - 1, imm=part.imm))
            pos += 1
        elif not isinstance(part, str):
            out.append(part)
            pos += len(part) // 8
    return b"".join(out)


# -- the bpf(2) syscall -------------------------------------------------------------------------------------

class BpfError(OSError):
    pass


class Bpf:
    """The syscall, and the few commands built on it. File descriptors it returns belong to the caller."""

    def __init__(self) -> None:
        machine = platform.machine()
        if machine not in _SYS_BPF:
            raise BpfError(errno.ENOSYS, f"no bpf(2) syscall number known for {machine}")
        self.nr = _SYS_BPF[machine]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def __call__(self, cmd: int, attr: bytes, what: str) -> int:
        buf = ctypes.create_string_buffer(attr, 128)  # bpf_attr, zero-padded
        ret = self.libc.syscall(ctypes.c_long(self.nr), ctypes.c_int(cmd), buf, ctypes.c_uint(128))
        if ret < 0:
            e = ctypes.get_errno()
            raise BpfError(e, f"{what}: {os.strerror(e)}")
        return ret

    def create_map(self, kind: int, key_size: int, value_size: int, entries: int, what: str) -> int:
        return self(BPF_MAP_CREATE, struct.pack("<IIIII", kind, key_size, value_size, entries, 0), f"create {what}")

    def update(self, map_fd: int, key: bytes, value: bytes, what: str, flags: int = BPF_ANY) -> None:
        k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
        self(BPF_MAP_UPDATE_ELEM, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), flags),
             what)

    def lookup(self, map_fd: int, key: bytes, value_size: int) -> bytes | None:
        """The value under key, or None; a SOCKHASH answers with the socket's cookie."""
        k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
        try:
            self(BPF_MAP_LOOKUP_ELEM, struct.pack("<IIQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v)),
                 "look up a map entry")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def delete(self, map_fd: int, key: bytes, what: str) -> None:
        """Remove key; one already gone (a closed socket leaves a SOCKHASH by itself) is no error."""
        k = ctypes.create_string_buffer(key, len(key))
        try:
            self(BPF_MAP_DELETE_ELEM, struct.pack("<IIQ", map_fd, 0, ctypes.addressof(k)), what)
        except BpfError as e:
            if e.errno != errno.ENOENT:
                raise

    def load(self, prog_type: int, code: bytes, name: bytes) -> int:
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        logbuf = ctypes.create_string_buffer(65536)
        attr = struct.pack("<IIQQIIQII16s", prog_type, len(code) // 8, ctypes.addressof(insns),
                           ctypes.addressof(license_), 1, len(logbuf), ctypes.addressof(logbuf), 0, 0, name)
        try:
            return self(BPF_PROG_LOAD, attr, f"load {name.decode()}")
        except BpfError as e:
            raise BpfError(e.errno, f"{e.strerror}; verifier: {logbuf.value.decode(errors='replace').strip()}") \
                from None

    def attach(self, target_fd: int, prog_fd: int, attach_type: int, what: str) -> None:
        """A program on a map (sk_skb, sk_msg): it stays until the map goes."""
        self(BPF_PROG_ATTACH, struct.pack("<IIII", target_fd, prog_fd, attach_type, 0), what)

    def link(self, prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
        """A program on a cgroup through a link: detached when the returned fd closes (or the process dies)."""
        return self(BPF_LINK_CREATE, struct.pack("<IIII", prog_fd, target_fd, attach_type, 0), what)
