//! The validator: every ioctl a sandbox makes on an nvidia node, judged
//! against one driver version's tables before anything reaches the driver.
//!
//! A pure function of (node, request, parameter block): the caller copies
//! the block the request names out of the sandbox first (its size is the
//! request's `_IOC_SIZE`, see [`frontend_block_size`]). The driver decodes
//! only `_IOC_NR` and `_IOC_SIZE`, so so does this; what is forwarded is the
//! canonical `_IOWR('F', nr, size)`, never the sandbox's type and direction
//! bits.

use std::mem::size_of;

use crate::abi::{Abi, Marshal, NodeRule};
use crate::layout::{
    NVOS02_FD_SIZE, NVOS21_SIZE, NVOS32_SIZE, NVOS54_SIZE, NVOS64_SIZE, at, read_u32, read_u64,
};

/// `EINVAL`: what the driver answers a transport-level error with.
pub const EINVAL: i32 = 22;

/// RM status codes (`nvstatuscodes.h`) written into a block's status field.
pub mod status {
    pub const NV_ERR_INVALID_ARGUMENT: u32 = 0x1F;
    pub const NV_ERR_INVALID_CLASS: u32 = 0x22;
    pub const NV_ERR_INVALID_PARAM_STRUCT: u32 = 0x3A;
    pub const NV_ERR_NOT_SUPPORTED: u32 = 0x56;
}

/// Escape numbers the validator treats specially.
pub mod esc {
    pub const RM_ALLOC_MEMORY: u32 = 0x27;
    pub const RM_FREE: u32 = 0x29;
    pub const RM_CONTROL: u32 = 0x2A;
    pub const RM_ALLOC: u32 = 0x2B;
    pub const RM_IDLE_CHANNELS: u32 = 0x41;
    pub const RM_VID_HEAP_CONTROL: u32 = 0x4A;
    pub const RM_MAP_MEMORY: u32 = 0x4E;
    pub const CARD_INFO: u32 = 200;
    pub const REGISTER_FD: u32 = 201;
    pub const ALLOC_OS_EVENT: u32 = 206;
    pub const FREE_OS_EVENT: u32 = 207;
    pub const CHECK_VERSION_STR: u32 = 210;
    pub const XFER: u32 = 211;
    pub const ATTACH_GPUS_TO_FD: u32 = 212;
    pub const NUMA_INFO: u32 = 215;
    pub const EXPORT_TO_DMABUF_FD: u32 = 217;
}

/// Largest control parameter block RM copies (`RMAPI_PARAM_COPY_MAX_PARAMS_SIZE`).
pub const MAX_CONTROL_PARAMS: u32 = 1 << 20;

/// The node a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `/dev/nvidiactl`.
    Ctl,
    /// A granted GPU's node.
    Gpu,
    /// `/dev/nvidia-uvm`.
    Uvm,
}

/// A buffer an embedded pointer names: copied into devproxy memory before
/// the call and back after it, the pointer rewritten to the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffer {
    /// Offset of the 8-byte pointer in the block.
    pub pointer_at: usize,
    /// Bytes it points to.
    pub len: usize,
}

/// How to perform an admitted call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The request to issue: `_IOWR('F', nr, size)`.
    pub request: u32,
    /// What it is, for the audit summary (`NV_ESC_RM_CONTROL
    /// NV2080_CTRL_CMD_GPU_GET_NAME_STRING`).
    pub what: String,
    /// Bytes of the block.
    pub block: usize,
    /// Embedded buffers to marshal.
    pub buffers: Vec<Buffer>,
    /// Offsets of 4-byte fds (the sandbox's numbers) to translate to the
    /// devproxy's duplicates.
    pub fds: Vec<usize>,
    /// What to do to the block after the call, before the sandbox sees it.
    pub after: After,
    /// For a control whose parameters name or list GPU ids: how they are
    /// held to the grant (before the call, and after it on the copy of
    /// its parameters).
    pub ids: Option<GpuIds>,
    /// For a control whose params embed pointers or fds: what they hold,
    /// resolved against the copied params by [`nested_buffers`] (the
    /// counts are the sandbox's data, read once from the proxy's copy).
    pub nested: Option<Marshal>,
}

/// Client-level RM controls whose parameters name or list GPUs by the
/// driver's id: what the sandbox may name, and what it may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuIds {
    /// `gpuIds[32]` the driver lists (`GPU_GET_ATTACHED_IDS`): only the
    /// granted ones are left.
    Attached,
    /// `gpuIds[32]`, `excludedGpuIds[32]` and, from 580, `gpuFlags[32]`
    /// (`GPU_GET_PROBED_IDS`): only the granted ones are left, each with
    /// its flags; no excluded GPU shows.
    Probed {
        /// Whether the parameters carry `gpuFlags`.
        flags: bool,
    },
    /// `gpuId` first (`GPU_GET_ID_INFO_V2`, `GPU_GET_PCI_INFO`,
    /// `GPU_GET_UUID_FROM_GPU_ID`, `GPU_QUERY_DRAIN_STATE`): it must be
    /// granted.
    Named,
    /// `gpuIds[32]` first (`GPU_ATTACH_IDS`, `GPU_DETACH_IDS`): each must
    /// be granted; "all" (`0xffff`) becomes the granted ones.
    NamedList,
    /// `NV0080_ALLOC_PARAMETERS` of a device object (`NV01_DEVICE_0`, the
    /// way to a GPU in RM): `deviceId` must be the device instance of a
    /// granted GPU, and no other client's device may be its target.
    DeviceAlloc,
    /// `deviceIds`, a bitmask of device instances (`GPU_GET_DEVICE_IDS`):
    /// only the granted GPUs' bits are left.
    DeviceMask,
    /// `numDevices` and `devices[256]` of 12 bytes each, `gpuId` first
    /// (`GPU_GET_ACTIVE_DEVICE_IDS`, with MIG instance ids after it): only
    /// the granted GPUs' entries are left, in order.
    Active,
}

impl GpuIds {
    /// Whether the rule needs the granted GPUs' device instances.
    pub fn needs_instances(self) -> bool {
        matches!(self, Self::DeviceAlloc | Self::DeviceMask)
    }
}

/// `NV01_DEVICE_0`.
pub const DEVICE_CLASS: u32 = 0x80;
/// `NV0000_CTRL_CMD_GPU_GET_ID_INFO_V2`, which tells a GPU's device
/// instance (`deviceInstance` at 8 of its 32-byte params).
pub const GET_ID_INFO_V2: u32 = 0x205;
/// Where `deviceInstance` is in `GET_ID_INFO_V2`'s params.
pub const DEVICE_INSTANCE_AT: usize = 8;
/// Bytes of `GET_ID_INFO_V2`'s params.
pub const ID_INFO_V2_SIZE: usize = 32;

/// `NV0000_CTRL_GPU_INVALID_ID`: ends a list of ids.
pub const INVALID_ID: u32 = 0xFFFF_FFFF;
/// `NV0000_CTRL_GPU_ATTACH_ALL_PROBED_IDS` / `DETACH_ALL_IDS`.
const ALL_IDS: u32 = 0x0000_FFFF;
/// `NV0000_CTRL_GPU_MAX_ATTACHED_GPUS` / `MAX_PROBED_GPUS`.
const MAX_IDS: usize = 32;

/// `GPU_GET_ACTIVE_DEVICE_IDS`: `numDevices`, then this many entries of
/// `ACTIVE_ENTRY` bytes (`gpuId`, `gpuInstanceId`, `computeInstanceId`).
const ACTIVE_MAX: usize = 256;
const ACTIVE_ENTRY: usize = 12;
const ACTIVE_PARAMS: usize = 4 + ACTIVE_MAX * ACTIVE_ENTRY;

/// The GPU-id rule of client-level control `cmd` with `params_size`
/// bytes of parameters.
fn gpu_id_rule(cmd: u32, params_size: u32) -> Option<GpuIds> {
    match cmd {
        0x201 => Some(GpuIds::Attached),
        0x214 => Some(GpuIds::Probed {
            flags: params_size as usize >= 3 * MAX_IDS * 4,
        }),
        0x202 | 0x205 | 0x21B | 0x275 | 0x279 => Some(GpuIds::Named),
        0x215 | 0x216 => Some(GpuIds::NamedList),
        0x204 => Some(GpuIds::DeviceMask),
        // 3076 = 4 + 256 x 12: the layout the rule reads.
        0x288 if params_size as usize == ACTIVE_PARAMS => Some(GpuIds::Active),
        _ => None,
    }
}

fn ids_at(params: &[u8], at: usize) -> Vec<u32> {
    (0..MAX_IDS).map(|i| read_u32(params, at + i * 4)).collect()
}

fn put_ids(params: &mut [u8], at: usize, ids: &[u32]) {
    for i in 0..MAX_IDS {
        let v = ids.get(i).copied().unwrap_or(INVALID_ID);
        if let Some(slot) = params.get_mut(at + i * 4..at + i * 4 + 4) {
            slot.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Before a control with rule `rule` runs: `Err` with the reason when its
/// parameters name a GPU outside the grant. "All GPUs" is rewritten to
/// the granted ones.
///
/// # Errors
/// The reason, for the audit.
pub fn gpu_ids_before(
    rule: GpuIds,
    params: &mut [u8],
    grant: &Grant,
    instances: &[u32],
) -> Result<(), String> {
    match rule {
        GpuIds::Attached | GpuIds::Probed { .. } | GpuIds::DeviceMask | GpuIds::Active => Ok(()),
        GpuIds::DeviceAlloc => {
            // deviceId @0, hTargetClient @8, hTargetDevice @12.
            let device = read_u32(params, 0);
            let (target_client, target_device) = (read_u32(params, 8), read_u32(params, 12));
            if target_client != 0 || target_device != 0 {
                return Err(format!(
                    "a device that targets another client's ({target_client:#x}/{target_device:#x}) is not allowed"
                ));
            }
            if instances.contains(&device) {
                Ok(())
            } else {
                Err(format!(
                    "device instance {device} is not a granted GPU's (granted: {instances:?})"
                ))
            }
        }
        GpuIds::Named => {
            let id = read_u32(params, 0);
            if grant.gpu_ids.contains(&id) {
                Ok(())
            } else {
                Err(format!("gpu id {id:#x} is not granted"))
            }
        }
        GpuIds::NamedList => {
            let ids = ids_at(params, 0);
            if ids.first() == Some(&ALL_IDS) {
                put_ids(params, 0, &grant.gpu_ids);
                return Ok(());
            }
            match ids
                .iter()
                .take_while(|id| **id != INVALID_ID)
                .find(|id| !grant.gpu_ids.contains(id))
            {
                Some(id) => Err(format!("gpu id {id:#x} is not granted")),
                None => Ok(()),
            }
        }
    }
}

/// After a control with rule `rule` ran: only granted GPUs are left in
/// the lists it returned.
pub fn gpu_ids_after(rule: GpuIds, params: &mut [u8], grant: &Grant, instances: &[u32]) {
    let keep = |ids: &[u32]| -> Vec<usize> {
        ids.iter()
            .enumerate()
            .filter(|(_, id)| **id != INVALID_ID && grant.gpu_ids.contains(id))
            .map(|(i, _)| i)
            .collect()
    };
    match rule {
        GpuIds::Attached => {
            let ids = ids_at(params, 0);
            let kept: Vec<u32> = keep(&ids).into_iter().map(|i| ids[i]).collect();
            put_ids(params, 0, &kept);
        }
        GpuIds::Probed { flags } => {
            let ids = ids_at(params, 0);
            let at_flags = 2 * MAX_IDS * 4;
            let fl = ids_at(params, at_flags);
            let idx = keep(&ids);
            let kept: Vec<u32> = idx.iter().map(|i| ids[*i]).collect();
            put_ids(params, 0, &kept);
            put_ids(params, MAX_IDS * 4, &[]);
            if flags {
                let kept_flags: Vec<u32> = idx.iter().map(|i| fl[*i]).collect();
                put_ids(params, at_flags, &kept_flags);
                // Unused flag slots are zero, not the invalid id.
                for i in kept_flags.len()..MAX_IDS {
                    if let Some(s) = params.get_mut(at_flags + i * 4..at_flags + i * 4 + 4) {
                        s.fill(0);
                    }
                }
            }
        }
        GpuIds::DeviceMask => {
            let mask: u32 = instances
                .iter()
                .filter(|i| **i < 32)
                .fold(0, |m, i| m | (1 << i));
            let got = read_u32(params, 0);
            if let Some(s) = params.get_mut(0..4) {
                s.copy_from_slice(&(got & mask).to_le_bytes());
            }
        }
        GpuIds::Active => {
            let n = (read_u32(params, 0) as usize).min(ACTIVE_MAX);
            let kept: Vec<Vec<u8>> = (0..n)
                .filter_map(|i| params.get(4 + i * ACTIVE_ENTRY..4 + (i + 1) * ACTIVE_ENTRY))
                .filter(|e| grant.gpu_ids.contains(&read_u32(e, 0)))
                .map(<[u8]>::to_vec)
                .collect();
            if let Some(list) = params.get_mut(4..ACTIVE_PARAMS) {
                list.fill(0);
                for (i, e) in kept.iter().enumerate() {
                    list[i * ACTIVE_ENTRY..(i + 1) * ACTIVE_ENTRY].copy_from_slice(e);
                }
            }
            if let Some(s) = params.get_mut(0..4) {
                s.copy_from_slice(&(kept.len() as u32).to_le_bytes());
            }
        }
        GpuIds::Named | GpuIds::NamedList | GpuIds::DeviceAlloc => {}
    }
}

/// Rewriting of a result before the sandbox sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum After {
    /// Nothing.
    #[default]
    Nothing,
    /// `NV_ESC_CARD_INFO`: keep only the granted GPUs' entries, in grant
    /// order, numbered as the sandbox's nodes are (see [`card_info`]).
    CardInfo,
}

/// Rewrites a `NV_ESC_CARD_INFO` result (an array of
/// `nv_ioctl_card_info_t`) so that it shows exactly the granted GPUs: the
/// k-th granted GPU's entry first-to-last, its minor number k (the
/// sandbox's `/dev/nvidiaK`), every other entry zeroed (not valid). The
/// host's other GPUs, their count and their numbering do not show.
pub fn card_info(block: &mut [u8], grant: &Grant) {
    const ENTRY: usize = std::mem::size_of::<crate::layout::nv_ioctl_card_info_t>();
    let valid_at = std::mem::offset_of!(crate::layout::nv_ioctl_card_info_t, valid);
    let id_at = std::mem::offset_of!(crate::layout::nv_ioctl_card_info_t, gpu_id);
    let minor_at = std::mem::offset_of!(crate::layout::nv_ioctl_card_info_t, minor_number);
    let entries: Vec<Vec<u8>> = block.chunks(ENTRY).map(<[u8]>::to_vec).collect();
    block.fill(0);
    let mut out = block.chunks_mut(ENTRY);
    for (k, id) in grant.gpu_ids.iter().enumerate() {
        let found = entries
            .iter()
            .find(|e| e.len() == ENTRY && e[valid_at] != 0 && read_u32(e, id_at) == *id);
        if let (Some(e), Some(slot)) = (found, out.next()) {
            slot.copy_from_slice(e);
            slot[minor_at..minor_at + 4].copy_from_slice(&(k as u32).to_le_bytes());
        }
    }
}

/// How the sandbox is answered when a call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The ioctl fails with this errno.
    Errno(i32),
    /// The ioctl returns 0 with this RM status written at `at` in the
    /// block, as the driver answers an unknown control or class.
    Status { at: usize, status: u32 },
}

/// A refused call: why (audited), and what the sandbox sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub reply: Reply,
}

/// The verdict on one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The devproxy performs it as planned.
    Forward(Plan),
    /// Let through by number in the sandbox's own context (UVM, whose
    /// calls bind to the caller's address space).
    Native { what: String },
    /// Never reaches the driver.
    Refuse(Refusal),
}

fn refuse_errno(reason: String) -> Decision {
    Decision::Refuse(Refusal {
        reason,
        reply: Reply::Errno(EINVAL),
    })
}

fn refuse_status(reason: String, at: usize, status: u32) -> Decision {
    Decision::Refuse(Refusal {
        reason,
        reply: Reply::Status { at, status },
    })
}

/// `_IOC_NR`, `_IOC_SIZE` of a request word (x86_64 layout).
pub fn decode(request: u64) -> (u32, u32) {
    ((request & 0xFF) as u32, ((request >> 16) & 0x3FFF) as u32)
}

/// The canonical request the proxy issues for `(nr, size)`.
pub fn canonical(nr: u32, size: u32) -> u32 {
    0xC000_0000 | (size << 16) | (0x46 << 8) | nr
}

/// Bytes of the block a frontend request names (what the caller copies in
/// before [`check`]).
pub fn frontend_block_size(request: u64) -> usize {
    decode(request).1 as usize
}

/// What the grant lets a sandbox see of the host's GPUs.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// The driver's gpu ids of the granted GPUs (from `NV_ESC_CARD_INFO`).
    pub gpu_ids: Vec<u32>,
}

/// Judges one ioctl on `node`. `block` holds exactly the bytes the request
/// names (for UVM, whatever the caller copied; it is not read).
pub fn check(abi: &Abi, grant: &Grant, node: Node, request: u64, block: &[u8]) -> Decision {
    if node == Node::Uvm {
        return check_uvm(abi, request);
    }
    // The kernel takes the request as an `unsigned int`: bits above 32
    // (a sign-extended constant, say) never reach the driver, so they do
    // not decide here either.
    let request = request & 0xFFFF_FFFF;
    let (nr, size) = decode(request);
    if block.len() != size as usize {
        return refuse_errno(format!(
            "escape {nr:#x}: {} bytes copied for a {size}-byte block",
            block.len()
        ));
    }
    if nr == esc::XFER {
        return refuse_errno(
            "escape 0xd3 (NV_ESC_IOCTL_XFER_CMD) is refused: every parameter block fits a direct call"
                .into(),
        );
    }
    let Some(e) = abi.escapes.get(&nr) else {
        return refuse_errno(format!(
            "escape {nr:#x} is unknown to driver {}",
            abi.version
        ));
    };
    let name = e.name.as_str();
    if !e.allowed {
        return refuse_errno(format!("escape {name} ({nr:#x}) is not allowed"));
    }
    let node_ok = match e.node {
        NodeRule::Ctl => node == Node::Ctl,
        NodeRule::Gpu => node == Node::Gpu,
        NodeRule::Any => true,
        // Only the event classes may come on a GPU node; checked with the
        // class below.
        NodeRule::CtlOrEvent => true,
        NodeRule::None => false,
    };
    if !node_ok {
        return refuse_errno(format!(
            "escape {name} ({nr:#x}) is not accepted on {node:?}"
        ));
    }
    let size_ok = abi.driver_accepts(nr, size);
    if !size_ok {
        return refuse_errno(format!(
            "escape {name} ({nr:#x}): size {size} does not match {:?} for driver {}",
            e.size, abi.version
        ));
    }
    let plan = |what: String, buffers: Vec<Buffer>, fds: Vec<usize>| {
        Decision::Forward(Plan {
            request: canonical(nr, size),
            what,
            block: size as usize,
            buffers,
            fds,
            after: if nr == esc::CARD_INFO {
                After::CardInfo
            } else {
                After::Nothing
            },
            ids: None,
            nested: None,
        })
    };
    match nr {
        esc::RM_CONTROL => check_control(abi, name, block, plan),
        esc::RM_ALLOC => check_alloc(abi, node, name, block, plan),
        esc::RM_ALLOC_MEMORY => {
            // NVOS02 + fd: only plain system and local memory; an OS
            // descriptor would make the driver pin the caller's pages,
            // which here would be the devproxy's.
            let class = read_u32(block, at::MEM_CLASS);
            if !matches!(class, 0x3E..=0x40) {
                return refuse_errno(format!(
                    "{name}: memory class {class:#x} is not allowed (only 0x3e, 0x3f, 0x40)"
                ));
            }
            debug_assert_eq!(block.len(), NVOS02_FD_SIZE);
            plan(format!("{name} class {class:#x}"), vec![], vec![at::MEM_FD])
        }
        esc::RM_MAP_MEMORY => plan(name.into(), vec![], vec![at::MAP_FD]),
        esc::RM_VID_HEAP_CONTROL => {
            // Only NVOS32_FUNCTION_ALLOC_SIZE (2): the other functions
            // carry pointers or OS descriptors in their union.
            debug_assert_eq!(block.len(), NVOS32_SIZE);
            let function = read_u32(block, at::HEAP_FUNCTION);
            if function != 2 {
                return refuse_errno(format!(
                    "{name}: function {function} is not allowed (only ALLOC_SIZE)"
                ));
            }
            plan(name.into(), vec![], vec![])
        }
        esc::REGISTER_FD => plan(name.into(), vec![], vec![at::REGISTER_FD]),
        esc::ALLOC_OS_EVENT | esc::FREE_OS_EVENT => {
            plan(name.into(), vec![], vec![at::OS_EVENT_FD])
        }
        esc::ATTACH_GPUS_TO_FD => {
            let ids: Vec<u32> = (0..block.len() / 4)
                .map(|i| read_u32(block, i * 4))
                .collect();
            if let Some(id) = ids.iter().find(|id| !grant.gpu_ids.contains(id)) {
                return refuse_errno(format!("{name}: gpu id {id:#x} is not granted"));
            }
            plan(name.into(), vec![], vec![])
        }
        esc::RM_IDLE_CHANNELS => refuse_errno(format!(
            "{name}: its three embedded arrays are not marshalled yet"
        )),
        esc::NUMA_INFO => refuse_errno(format!(
            "{name}: the host's NUMA layout is not the sandbox's to read"
        )),
        esc::EXPORT_TO_DMABUF_FD => refuse_errno(format!(
            "{name}: it makes a new fd in the caller, not marshalled yet"
        )),
        _ => plan(name.into(), vec![], vec![]),
    }
}

fn check_control(
    abi: &Abi,
    name: &str,
    block: &[u8],
    plan: impl Fn(String, Vec<Buffer>, Vec<usize>) -> Decision,
) -> Decision {
    debug_assert_eq!(block.len(), NVOS54_SIZE);
    let cmd = read_u32(block, at::CTRL_CMD);
    let params = read_u64(block, at::CTRL_PARAMS);
    let params_size = read_u32(block, at::CTRL_PARAMS_SIZE);
    let Some(c) = abi.controls.get(&cmd) else {
        return refuse_status(
            format!("{name}: control {cmd:#x} is not allowed"),
            at::CTRL_STATUS,
            status::NV_ERR_NOT_SUPPORTED,
        );
    };
    let nested = match (&c.marshal, c.embedded) {
        (Some(m), true) => Some(m.clone()),
        (_, false) => None,
        (None, true) => {
            return refuse_status(
                format!(
                    "{name}: control {} ({cmd:#x}) embeds pointers or fds this proxy does not marshal",
                    c.name
                ),
                at::CTRL_STATUS,
                status::NV_ERR_NOT_SUPPORTED,
            );
        }
    };
    if (params == 0) != (params_size == 0) {
        return refuse_errno(format!(
            "{name}: control {} ({cmd:#x}): params pointer and size disagree",
            c.name
        ));
    }
    if params_size != c.param_size || params_size > MAX_CONTROL_PARAMS {
        return refuse_status(
            format!(
                "{name}: control {} ({cmd:#x}) takes {} bytes of params, not {params_size}",
                c.name, c.param_size
            ),
            at::CTRL_STATUS,
            status::NV_ERR_INVALID_PARAM_STRUCT,
        );
    }
    let buffers = if params_size > 0 {
        vec![Buffer {
            pointer_at: at::CTRL_PARAMS,
            len: params_size as usize,
        }]
    } else {
        vec![]
    };
    let decision = plan(format!("{name} {}", c.name), buffers, vec![]);
    match decision {
        Decision::Forward(mut p) if params_size > 0 => {
            p.ids = gpu_id_rule(cmd, params_size);
            p.nested = nested;
            Decision::Forward(p)
        }
        d => d,
    }
}

/// The event classes, which RM also takes on a GPU node.
const EVENT_CLASSES: &[u32] = &[0x05, 0x78, 0x79, 0x7E];

fn check_alloc(
    abi: &Abi,
    node: Node,
    name: &str,
    block: &[u8],
    plan: impl Fn(String, Vec<Buffer>, Vec<usize>) -> Decision,
) -> Decision {
    // NVOS21 (32 bytes: status @28) or NVOS64 (48: pRightsRequested @24,
    // status @40); hClass @12 and pAllocParms @16 in both.
    let status_at = if block.len() == NVOS64_SIZE {
        at::ALLOC64_STATUS
    } else {
        at::ALLOC21_STATUS
    };
    debug_assert!(block.len() == NVOS21_SIZE || block.len() == NVOS64_SIZE);
    let class = read_u32(block, at::ALLOC_CLASS);
    let Some(c) = abi.classes.get(&class) else {
        return refuse_status(
            format!("{name}: class {class:#x} is not allowed"),
            status_at,
            status::NV_ERR_INVALID_CLASS,
        );
    };
    if node != Node::Ctl && !EVENT_CLASSES.contains(&class) {
        return refuse_errno(format!(
            "{name}: class {} ({class:#x}) is allocated on nvidiactl only",
            c.name
        ));
    }
    let nested = match (&c.marshal, c.plain) {
        (_, true) => None,
        (Some(m), false) => Some(m.clone()),
        (None, false) => {
            return refuse_status(
                format!(
                    "{name}: class {} ({class:#x}) embeds fds or pointers this proxy does not marshal",
                    c.name
                ),
                status_at,
                status::NV_ERR_INVALID_CLASS,
            );
        }
    };
    let params = read_u64(block, at::ALLOC_PARAMS);
    let mut buffers = Vec::new();
    if c.param_size > 0 && params != 0 {
        buffers.push(Buffer {
            pointer_at: at::ALLOC_PARAMS,
            len: c.param_size as usize,
        });
    } else if c.required {
        return refuse_status(
            format!("{name}: class {} ({class:#x}) needs its params", c.name),
            status_at,
            status::NV_ERR_INVALID_ARGUMENT,
        );
    } else if params != 0 {
        // A class without params: RM reads nothing, and neither do we.
    }
    if block.len() == NVOS64_SIZE && read_u64(block, at::ALLOC_RIGHTS) != 0 {
        // pRightsRequested: an RS_ACCESS_MASK.
        buffers.push(Buffer {
            pointer_at: at::ALLOC_RIGHTS,
            len: size_of::<crate::layout::RS_ACCESS_MASK>(),
        });
    }
    let has_params = buffers
        .first()
        .is_some_and(|b| b.pointer_at == at::ALLOC_PARAMS);
    if nested.is_some() && !has_params {
        return refuse_status(
            format!("{name}: class {} ({class:#x}) needs its params", c.name),
            status_at,
            status::NV_ERR_INVALID_ARGUMENT,
        );
    }
    match plan(format!("{name} {}", c.name), buffers, vec![]) {
        Decision::Forward(mut p) if nested.is_some() => {
            p.nested = nested;
            Decision::Forward(p)
        }
        Decision::Forward(mut p) if class == DEVICE_CLASS => {
            if !has_params {
                return refuse_status(
                    format!("{name}: a device needs its params (the GPU's device instance)"),
                    status_at,
                    status::NV_ERR_INVALID_ARGUMENT,
                );
            }
            p.ids = Some(GpuIds::DeviceAlloc);
            Decision::Forward(p)
        }
        d => d,
    }
}

/// Where the status of a refused RM call goes in its block of `len`
/// bytes (`request`'s escape): an alloc's NVOS21/NVOS64 status, or a
/// control's NVOS54 status.
pub fn status_at(request: u32, len: usize) -> usize {
    match decode(u64::from(request)).0 {
        esc::RM_ALLOC if len == NVOS64_SIZE => at::ALLOC64_STATUS,
        esc::RM_ALLOC => at::ALLOC21_STATUS,
        _ => at::CTRL_STATUS,
    }
}

/// The buffers the embedded pointers of a control's params name, from the
/// proxy's copy of those params (`params`, which the sandbox can no longer
/// change): each non-NULL array pointer names `count` elements; NULL stays
/// NULL (the driver's "how many?" form). `Buffer::pointer_at` is an offset
/// into the params.
///
/// # Errors
/// A reason, answered `NV_ERR_INVALID_ARGUMENT` as the driver does, when
/// an array would exceed the driver's own bound on what it copies
/// ([`MAX_CONTROL_PARAMS`]).
pub fn nested_buffers(m: &Marshal, params: &[u8]) -> Result<Vec<Buffer>, String> {
    let count = match m.count {
        Some((at, 4)) if at + 4 <= params.len() => u64::from(read_u32(params, at)),
        Some((at, bytes)) => {
            return Err(format!(
                "its {bytes}-byte count at {at} does not fit {} bytes of params",
                params.len()
            ));
        }
        None => 0,
    };
    let mut out = Vec::with_capacity(m.arrays.len());
    for &(at, elem) in &m.arrays {
        if at + 8 > params.len() {
            return Err(format!("its pointer at {at} is past its params"));
        }
        if read_u64(params, at) == 0 {
            continue;
        }
        let len = count.saturating_mul(elem as u64);
        if len > u64::from(MAX_CONTROL_PARAMS) {
            return Err(format!(
                "{count} elements of {elem} bytes exceed the driver's {MAX_CONTROL_PARAMS}-byte bound"
            ));
        }
        out.push(Buffer {
            pointer_at: at,
            len: len as usize,
        });
    }
    Ok(out)
}

fn check_uvm(abi: &Abi, request: u64) -> Decision {
    let number = (request & 0xFFFF_FFFF) as u32;
    match abi.uvm.get(&number) {
        Some(u) if u.allowed && u.routed => Decision::Native {
            what: u.name.clone(),
        },
        Some(u) => refuse_errno(format!("UVM {} ({number}) is not allowed", u.name)),
        None => refuse_errno(format!(
            "UVM request {number:#x} is unknown to driver {}",
            abi.version
        )),
    }
}
