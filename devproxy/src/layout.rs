//! `repr(C)` mirrors of the parameter blocks the validator reads or the
//! forwarder fills, under their C names. Each is tested against the layout
//! recorded for every driver version that defines it (`tests/abi.rs`): size,
//! alignment, and each field's offset and size.
//!
//! The validator reads blocks as bytes at these mirrors' offsets
//! ([`read_u32`], [`read_u64`]); it never reinterprets sandbox bytes as a
//! struct.
#![allow(non_camel_case_types, non_snake_case)]

use std::mem::{offset_of, size_of};

/// A mirrored struct's `(field, offset, size)` list, size and alignment.
pub trait Mirror {
    const NAME: &'static str;
    fn fields() -> Vec<(&'static str, usize, usize)>;
    fn size() -> usize;
    fn align() -> usize;
}

macro_rules! mirror {
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy)]
        pub struct $name { $(pub $field: $ty),* }

        impl Mirror for $name {
            const NAME: &'static str = stringify!($name);
            fn fields() -> Vec<(&'static str, usize, usize)> {
                vec![$((stringify!($field), offset_of!($name, $field), size_of::<$ty>())),*]
            }
            fn size() -> usize {
                size_of::<$name>()
            }
            fn align() -> usize {
                std::mem::align_of::<$name>()
            }
        }
    };
}

/// `NvP64`: a user pointer, 8-byte aligned.
pub type NvP64 = u64;
pub type NvHandle = u32;

mirror!(
    /// RM free (`NV_ESC_RM_FREE`).
    NVOS00_PARAMETERS { hRoot: NvHandle, hObjectParent: NvHandle, hObjectOld: NvHandle, status: u32 }
);
mirror!(
    /// RM alloc, short form.
    NVOS21_PARAMETERS {
        hRoot: NvHandle, hObjectParent: NvHandle, hObjectNew: NvHandle, hClass: u32,
        pAllocParms: NvP64, paramsSize: u32, status: u32,
    }
);
mirror!(
    /// RM alloc, long form (with requested rights and flags).
    NVOS64_PARAMETERS {
        hRoot: NvHandle, hObjectParent: NvHandle, hObjectNew: NvHandle, hClass: u32,
        pAllocParms: NvP64, pRightsRequested: NvP64, paramsSize: u32, flags: u32, status: u32,
    }
);
mirror!(
    /// RM control.
    NVOS54_PARAMETERS {
        hClient: NvHandle, hObject: NvHandle, cmd: u32, flags: u32, params: NvP64,
        paramsSize: u32, status: u32,
    }
);
mirror!(
    /// RM dup object.
    NVOS55_PARAMETERS {
        hClient: NvHandle, hParent: NvHandle, hObject: NvHandle, hClientSrc: NvHandle,
        hObjectSrc: NvHandle, flags: u32, status: u32,
    }
);
mirror!(
    /// `RS_SHARE_POLICY`, inside NVOS57.
    RS_SHARE_POLICY { target: u32, accessMask: RS_ACCESS_MASK, r#type: u16, action: u8 }
);
mirror!(
    /// RM share.
    NVOS57_PARAMETERS { hClient: NvHandle, hObject: NvHandle, sharePolicy: RS_SHARE_POLICY, status: u32 }
);
mirror!(
    /// `RS_ACCESS_MASK`: one 32-bit limb.
    RS_ACCESS_MASK { limbs: [u32; 1] }
);
mirror!(
    /// RM alloc memory (inside `nv_ioctl_nvos02_parameters_with_fd`).
    NVOS02_PARAMETERS {
        hRoot: NvHandle, hObjectParent: NvHandle, hObjectNew: NvHandle, hClass: u32, flags: u32,
        pMemory: NvP64, limit: u64, status: u32,
    }
);
mirror!(
    /// RM map memory (inside `nv_ioctl_nvos33_parameters_with_fd`).
    NVOS33_PARAMETERS {
        hClient: NvHandle, hDevice: NvHandle, hMemory: NvHandle, offset: u64, length: u64,
        pLinearAddress: NvP64, status: u32, flags: u32,
    }
);
mirror!(
    /// RM unmap memory.
    NVOS34_PARAMETERS {
        hClient: NvHandle, hDevice: NvHandle, hMemory: NvHandle, pLinearAddress: NvP64,
        status: u32, flags: u32,
    }
);
mirror!(
    /// RM video heap control; `data` is a per-function union.
    NVOS32_PARAMETERS {
        hRoot: NvHandle, hObjectParent: NvHandle, function: u32, hVASpace: NvHandle,
        ivcHeapNumber: i16, status: u32, total: u64, free: u64, data: [u64; 18],
    }
);
mirror!(
    /// NVOS02 plus the fd the mapping context goes to.
    nv_ioctl_nvos02_parameters_with_fd { params: NVOS02_PARAMETERS, fd: i32 }
);
mirror!(
    /// NVOS33 plus the fd the mapping context goes to.
    nv_ioctl_nvos33_parameters_with_fd { params: NVOS33_PARAMETERS, fd: i32 }
);
mirror!(
    /// `NV_ESC_IOCTL_XFER_CMD`: an inner command, size and pointer.
    nv_ioctl_xfer_t { cmd: u32, size: u32, ptr: NvP64 }
);
mirror!(
    /// The version handshake (`NV_ESC_CHECK_VERSION_STR`).
    nv_ioctl_rm_api_version_t { cmd: u32, reply: u32, versionString: [u8; 64] }
);
mirror!(
    /// `nv_pci_info_t`, inside the card info.
    nv_pci_info_t { domain: u32, bus: u8, slot: u8, function: u8, vendor_id: u16, device_id: u16 }
);
mirror!(
    /// One GPU's card info (`NV_ESC_CARD_INFO` returns an array).
    nv_ioctl_card_info_t {
        valid: u8, pci_info: nv_pci_info_t, gpu_id: u32, interrupt_line: u16, reg_address: u64,
        reg_size: u64, fb_address: u64, fb_size: u64, minor_number: u32, dev_name: [u8; 10],
    }
);
mirror!(
    /// `NV_ESC_REGISTER_FD`.
    nv_ioctl_register_fd_t { ctl_fd: i32 }
);
mirror!(
    /// `NV_ESC_ALLOC_OS_EVENT`.
    nv_ioctl_alloc_os_event_t { hClient: NvHandle, hDevice: NvHandle, fd: u32, Status: u32 }
);
mirror!(
    /// `NV_ESC_FREE_OS_EVENT`.
    nv_ioctl_free_os_event_t { hClient: NvHandle, hDevice: NvHandle, fd: u32, Status: u32 }
);
mirror!(
    /// `NV_ESC_SYS_PARAMS`.
    nv_ioctl_sys_params_t { memblock_size: u64 }
);
mirror!(
    /// `NV_ESC_WAIT_OPEN_COMPLETE` (550 and later).
    nv_ioctl_wait_open_complete_t { rc: i32, adapterStatus: u32 }
);
mirror!(
    /// `UVM_INITIALIZE`.
    UVM_INITIALIZE_PARAMS { flags: u64, rmStatus: u32 }
);
mirror!(
    /// `UVM_MM_INITIALIZE`.
    UVM_MM_INITIALIZE_PARAMS { uvmFd: i32, rmStatus: u32 }
);

/// Sizes the validator relies on.
pub const NVOS21_SIZE: usize = size_of::<NVOS21_PARAMETERS>();
pub const NVOS64_SIZE: usize = size_of::<NVOS64_PARAMETERS>();
pub const NVOS54_SIZE: usize = size_of::<NVOS54_PARAMETERS>();
pub const NVOS32_SIZE: usize = size_of::<NVOS32_PARAMETERS>();
pub const NVOS02_FD_SIZE: usize = size_of::<nv_ioctl_nvos02_parameters_with_fd>();

/// Offsets the validator reads and the forwarder rewrites.
pub mod at {
    use super::*;
    pub const CTRL_CMD: usize = offset_of!(NVOS54_PARAMETERS, cmd);
    pub const CTRL_PARAMS: usize = offset_of!(NVOS54_PARAMETERS, params);
    pub const CTRL_PARAMS_SIZE: usize = offset_of!(NVOS54_PARAMETERS, paramsSize);
    pub const CTRL_STATUS: usize = offset_of!(NVOS54_PARAMETERS, status);
    pub const ALLOC_CLASS: usize = offset_of!(NVOS64_PARAMETERS, hClass);
    pub const ALLOC_PARAMS: usize = offset_of!(NVOS64_PARAMETERS, pAllocParms);
    pub const ALLOC_RIGHTS: usize = offset_of!(NVOS64_PARAMETERS, pRightsRequested);
    pub const ALLOC21_STATUS: usize = offset_of!(NVOS21_PARAMETERS, status);
    pub const ALLOC64_STATUS: usize = offset_of!(NVOS64_PARAMETERS, status);
    pub const MEM_CLASS: usize = offset_of!(NVOS02_PARAMETERS, hClass);
    pub const MEM_FD: usize = offset_of!(nv_ioctl_nvos02_parameters_with_fd, fd);
    pub const MAP_FD: usize = offset_of!(nv_ioctl_nvos33_parameters_with_fd, fd);
    pub const HEAP_FUNCTION: usize = offset_of!(NVOS32_PARAMETERS, function);
    pub const REGISTER_FD: usize = offset_of!(nv_ioctl_register_fd_t, ctl_fd);
    pub const OS_EVENT_FD: usize = offset_of!(nv_ioctl_alloc_os_event_t, fd);
}

/// The little-endian u32 at `at` (0 past the end: callers check sizes first).
pub fn read_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// The little-endian u64 at `at` (0 past the end).
pub fn read_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// One mirror's name, `(field, offset, size)` list, size and alignment.
#[derive(Debug, Clone)]
pub struct MirrorInfo {
    pub name: &'static str,
    pub fields: Vec<(&'static str, usize, usize)>,
    pub size: usize,
    pub align: usize,
}

/// Every mirror, for the layout tests.
pub fn mirrors() -> Vec<MirrorInfo> {
    fn one<T: Mirror>() -> MirrorInfo {
        MirrorInfo {
            name: T::NAME,
            fields: T::fields(),
            size: T::size(),
            align: T::align(),
        }
    }
    vec![
        one::<NVOS00_PARAMETERS>(),
        one::<NVOS21_PARAMETERS>(),
        one::<NVOS64_PARAMETERS>(),
        one::<NVOS54_PARAMETERS>(),
        one::<NVOS55_PARAMETERS>(),
        one::<NVOS57_PARAMETERS>(),
        one::<RS_ACCESS_MASK>(),
        one::<NVOS02_PARAMETERS>(),
        one::<NVOS33_PARAMETERS>(),
        one::<NVOS34_PARAMETERS>(),
        one::<NVOS32_PARAMETERS>(),
        one::<nv_ioctl_nvos02_parameters_with_fd>(),
        one::<nv_ioctl_nvos33_parameters_with_fd>(),
        one::<nv_ioctl_xfer_t>(),
        one::<nv_ioctl_rm_api_version_t>(),
        one::<nv_ioctl_card_info_t>(),
        one::<nv_ioctl_register_fd_t>(),
        one::<nv_ioctl_alloc_os_event_t>(),
        one::<nv_ioctl_free_os_event_t>(),
        one::<nv_ioctl_sys_params_t>(),
        one::<nv_ioctl_wait_open_complete_t>(),
        one::<UVM_INITIALIZE_PARAMS>(),
        one::<UVM_MM_INITIALIZE_PARAMS>(),
    ]
}
