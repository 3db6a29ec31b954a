//! devproxy: NVIDIA GPUs for sandboxes, with every driver ioctl checked
//! against the exact ABI of the host's driver before the driver sees it.
//!
//! # What this crate holds today
//! - [`abi`]: the ABI tables per driver version (escape numbers with their
//!   node and size rules, UVM numbers and sizes, admitted RM alloc classes
//!   and control commands with their parameter sizes), stored as a version
//!   tree in `abi/abi.json` (generated from the driver facts by
//!   `tools/gen_abi.py`: the oldest version in full, each later one as its
//!   changes), and the choice of tables for a host driver version
//!   ([`abi::AbiSet::select`]), refusing unknown versions with a message
//!   that names the nearest supported ones and the opt-in knob.
//! - [`validate`]: the validator, a pure function from (node, request,
//!   parameter block) to a [`validate::Decision`]: forward with a
//!   marshalling plan, run natively (UVM, bound to the caller's address
//!   space), or refuse with the reason and the reply the sandbox gets.
//! - [`layout`]: `repr(C)` mirrors of the parameter blocks the validator
//!   reads, each tested against the recorded layout of every version.
//! - [`filter`]: the sandbox side's seccomp filter for a version, as BPF
//!   data; [`forward`]: the forwarder serving its listener; [`detect`]:
//!   the host driver's version from the handshake.
//!
//! # Mechanism (the design this validator serves)
//! The driver maps device memory into the caller through mmap on the
//! device fds, and UVM binds itself to the calling process's address space
//! (`UVM_INITIALIZE` records `current->mm`). So a proxy cannot own the
//! device files and serve a FUSE or CUSE stand-in: mmap of device memory
//! must happen on a file the sandbox holds, and UVM calls must come from
//! the sandbox's own process. The design:
//! - the sandbox's `/dev/nvidiactl`, `/dev/nvidiaN` (only the granted GPUs,
//!   renumbered from 0) and `/dev/nvidia-uvm` open the real devices; they
//!   are the only device nodes of the driver the sandbox can reach (it
//!   can neither make nodes nor mount), and on cgroup v1 the sandbox's
//!   devices cgroup bounds what it may open as well (v2's BPF
//!   equivalent: not yet);
//! - a seccomp filter in the sandbox sends every `ioctl` on those nodes to
//!   the sandbox's devproxy process with `SECCOMP_RET_USER_NOTIF`; the BPF
//!   keys on the `(nr, size)` pairs the driver could accept, not on the
//!   `'F'` magic, because the driver ignores the type and direction bits;
//! - the devproxy copies the parameter block out of the sandbox
//!   (`process_vm_readv`), validates it here, performs the call itself on
//!   its own duplicate of the sandbox's fd (`pidfd_getfd`) with the block
//!   and every embedded buffer in its own memory, copies results back and
//!   answers the notification with the driver's return value. mmap then
//!   works natively on the sandbox's fd: the mapping context the call set
//!   up belongs to the shared open file description;
//! - a call is never answered with `SECCOMP_USER_NOTIF_FLAG_CONTINUE` after
//!   checking its memory or its fd: another thread can rewrite the block
//!   or `dup2` a different file onto the number in between. Only calls
//!   whose safety depends on neither are let through: the admitted UVM
//!   calls, by exact number in the BPF itself (they must run in the
//!   caller's context; their numbers carry no size), and another device's
//!   request that shares an escape's nr on a file that is no granted
//!   device, when no escape takes its (nr, size) and no UVM number could
//!   be it (whatever file the fd names when it runs, no driver acts on
//!   it). The sandbox's filter is generated per version ([`filter`]);
//! - the devproxy runs as the sandbox range's nobody inside the sandbox's
//!   user namespace, with CAP_SYS_PTRACE there only (what reading a
//!   caller's memory and duplicating its fd check for) and no capability
//!   in the host's namespace (the driver grants extra rights to
//!   privileged callers), jailed and in the sandbox's cgroup, one process
//!   per sandbox: the broker's `__devproxy` role
//!   (`broker/src/gpu_server.rs`).
//!
//! Why not the other designs: a FUSE or CUSE stand-in cannot provide
//! device mmap, and a proxy cannot issue UVM calls for another process's
//! address space; gVisor's approach (every call from its own kernel)
//! needs a user-space kernel in between. Handing the sandbox raw device
//! fds without mediation reaches every driver entry point. Seccomp user
//! notification keeps mmap and UVM native and puts only the driver's
//! ioctls through the check. The price is a round trip per checked call
//! (16-22 µs on a 2-vCPU VM whose bare notification round trip is
//! 5-6 µs, see the README's benchmark). One risk
//! only a GPU can settle: RM clients are allocated by the proxy's
//! process, while UVM calls come from the sandbox's process, so a driver
//! that ties an RM client to the process that made it would refuse
//! UVM's use of it.
//!
//! Embedded pointers are never handed to the driver raw: a control's or
//! alloc's parameter buffer is copied into devproxy memory
//! ([`validate::Plan`]), and the pointers and fds inside it are marshalled
//! by the shape the tables record for it ([`abi::Marshal`]: arrays into
//! guarded buffers of the proxy's, fds replaced by the proxy's duplicates
//! of granted nodes); one whose shape is not known is refused
//! ([`validate::Refusal`] says which).
#![deny(unsafe_code)]

pub mod abi;
pub mod detect;
pub mod filter;
pub mod forward;
pub mod layout;
mod sys;
pub mod validate;

pub use abi::{Abi, AbiError, AbiSet, DriverVersion, VersionPolicy};
pub use validate::{Decision, Node, Plan, Refusal, Reply};
