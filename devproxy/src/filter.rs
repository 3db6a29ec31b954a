//! The sandbox side's seccomp filter, as data: which `ioctl`s go to the
//! devproxy (`SECCOMP_RET_USER_NOTIF`), which run natively, and which the
//! filter leaves to the sandbox's own policy.
//!
//! The driver decodes only `_IOC_NR` and `_IOC_SIZE`, so the filter
//! matches those, never the `'F'` type or the direction bits. Notified:
//! every request whose nr is an escape of this driver (or XFER), whatever
//! its size, so that a wrong size on an nvidia fd is refused by the proxy
//! and never reaches the driver; every small integer (below [`SMALL`], where
//! UVM numbers live, its test numbers included) and every other UVM
//! number, except the admitted UVM numbers, which are allowed here by
//! exact value: their calls must run in the caller's context, and neither
//! memory nor the fd decides their safety (on a frontend node they decode
//! as no escape). Everything else is not this filter's business
//! (`SECCOMP_RET_ALLOW` here; the sandbox's main filter still applies).
//!
//! Requests of other devices share those nr values (`TIOCGPTPEER` is nr
//! 0x41, `TCGETS2` nr 0x2a). On a file that is not a granted device the
//! proxy lets such a request continue only when no escape of the driver
//! accepts its (nr, size) and it is no UVM number
//! ([`crate::forward`]): then whichever file the fd names when it runs,
//! no driver acts on it, so its safety depends neither on memory nor on
//! the file.
//!
//! Only the low 32 bits of the request are examined: the kernel takes it
//! as an `unsigned int`.

use std::collections::BTreeSet;

use crate::abi::Abi;
use crate::validate::esc;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    /// Its 8 bytes as the kernel reads them (little-endian fields).
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.code.to_le_bytes());
        b[2] = self.jt;
        b[3] = self.jf;
        b[4..8].copy_from_slice(&self.k.to_le_bytes());
        b
    }
}

// Classic BPF opcodes (linux/filter.h): class | size | mode, or class |
// op | source. Only these are used, all admitted by seccomp's checker.
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const ALU_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_USER_NOTIF: u32 = libc::SECCOMP_RET_USER_NOTIF;
/// `AUDIT_ARCH_X86_64` (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const SYS_IOCTL_X86_64: u32 = libc::SYS_ioctl as u32;

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG1_LO: u32 = 16 + 8;

/// Why a filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// More tests than classic BPF's 8-bit jumps reach.
    #[error("the ioctl filter needs a jump of {0} instructions, over classic BPF's 255")]
    TooFar(usize),
}

/// What the filter checks for `abi`: the UVM numbers that run natively,
/// the other UVM numbers (notified), and the escape numbers (notified
/// whatever their size).
fn plan(abi: &Abi) -> (Vec<u32>, Vec<u32>, BTreeSet<u32>) {
    let native = abi.native_uvm();
    let other_uvm = abi
        .uvm
        .keys()
        .copied()
        .filter(|n| !native.contains(n) && *n >= SMALL)
        .collect();
    let mut nrs: BTreeSet<u32> = abi.escapes.keys().copied().collect();
    nrs.insert(esc::XFER);
    (native, other_uvm, nrs)
}

/// Requests below this are small integers: UVM numbers and the UVM test
/// numbers a module option enables (`200 + i`, past 0x100 with enough
/// tests), never an `_IOC` request with a size. A few sizeless `_IO`
/// requests of types below 0x10 fall here too (`FIGETBSZ` is 2,
/// `HDIO_GETGEO` 0x301): in a sandbox with GPUs they get ENOTTY.
pub const SMALL: u32 = 0x1000;

/// Where a conditional jump goes.
#[derive(Debug, Clone, Copy)]
enum To {
    /// The final `SECCOMP_RET_ALLOW`.
    Allow,
    /// The final `SECCOMP_RET_USER_NOTIF`.
    Notify,
    /// This many instructions ahead (0: the next one).
    Ahead(usize),
}

#[derive(Debug)]
enum Op {
    Plain(Insn),
    Cond { code: u16, k: u32, jt: To, jf: To },
}

fn plain(code: u16, k: u32) -> Op {
    Op::Plain(Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    })
}

fn cond(code: u16, k: u32, jt: To, jf: To) -> Op {
    Op::Cond { code, k, jt, jf }
}

/// The filter for `abi` (x86_64), to install with
/// `SECCOMP_FILTER_FLAG_NEW_LISTENER` in the sandbox's first process.
///
/// # Errors
/// [`FilterError::TooFar`] if the tables ever outgrow classic BPF jumps.
pub fn ioctl_filter(abi: &Abi) -> Result<Vec<Insn>, FilterError> {
    let (native, other_uvm, nrs) = plan(abi);
    let next = To::Ahead(0);
    let mut ops = vec![
        plain(LD_W_ABS, OFF_ARCH),
        cond(JEQ_K, AUDIT_ARCH_X86_64, next, To::Allow),
        plain(LD_W_ABS, OFF_NR),
        cond(JEQ_K, SYS_IOCTL_X86_64, next, To::Allow),
        plain(LD_W_ABS, OFF_ARG1_LO),
    ];
    for n in &native {
        ops.push(cond(JEQ_K, *n, To::Allow, next));
    }
    ops.push(cond(JGE_K, SMALL, next, To::Notify));
    for n in &other_uvm {
        ops.push(cond(JEQ_K, *n, To::Notify, next));
    }
    ops.push(plain(ALU_AND_K, 0xFF));
    for nr in &nrs {
        ops.push(cond(JEQ_K, *nr, To::Notify, next));
    }
    ops.push(plain(RET_K, RET_ALLOW));
    let allow_at = ops.len() - 1;
    ops.push(plain(RET_K, RET_USER_NOTIF));
    let notify_at = ops.len() - 1;
    let mut out = Vec::with_capacity(ops.len());
    for (pos, op) in ops.iter().enumerate() {
        let rel = |t: To| -> Result<u8, FilterError> {
            let d = match t {
                To::Allow => allow_at - pos - 1,
                To::Notify => notify_at - pos - 1,
                To::Ahead(n) => n,
            };
            u8::try_from(d).map_err(|_| FilterError::TooFar(d))
        };
        out.push(match op {
            Op::Plain(x) => *x,
            Op::Cond { code, k, jt, jf } => Insn {
                code: *code,
                jt: rel(*jt)?,
                jf: rel(*jf)?,
                k: *k,
            },
        });
    }
    Ok(out)
}

/// Runs `prog` on a syscall the way the kernel's classic BPF interpreter
/// does (the instructions the filter uses; any other ends it with 0), for tests of the filter's meaning:
/// the action it returns.
pub fn run(prog: &[Insn], arch: u32, syscall: u32, request: u64) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&syscall.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    data[24..32].copy_from_slice(&request.to_le_bytes());
    let word = |off: u32| {
        let o = off as usize;
        u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]])
    };
    let mut a = 0u32;
    let mut pc = 0usize;
    while let Some(i) = prog.get(pc) {
        pc += 1;
        match i.code {
            LD_W_ABS => a = word(i.k),
            ALU_AND_K => a &= i.k,
            JEQ_K | JGE_K => {
                let t = if i.code == JEQ_K { a == i.k } else { a >= i.k };
                pc += usize::from(if t { i.jt } else { i.jf });
            }
            RET_K => return i.k,
            _ => return 0,
        }
    }
    0
}

/// `SECCOMP_RET_ALLOW` and `SECCOMP_RET_USER_NOTIF`, for [`run`]'s callers.
pub const ALLOW: u32 = RET_ALLOW;
pub const NOTIFY: u32 = RET_USER_NOTIF;
/// x86_64's audit arch and ioctl number, for [`run`]'s callers.
pub const ARCH: u32 = AUDIT_ARCH_X86_64;
pub const SYS_IOCTL: u32 = SYS_IOCTL_X86_64;
