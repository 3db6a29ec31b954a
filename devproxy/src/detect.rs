//! The host driver's version, asked of the driver itself: the version
//! handshake (`NV_ESC_CHECK_VERSION_STR`) in query mode, as libnvidia
//! does at start-up. Never guessed from files (a loaded module and the
//! files on disk can disagree after an upgrade without a reboot).

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::path::Path;

use crate::layout::nv_ioctl_rm_api_version_t;
use crate::sys;
use crate::validate::{canonical, esc};

/// Why the host driver's version is not known.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// No control device: no NVIDIA driver is loaded.
    #[error("no NVIDIA driver on this host: {0} does not exist")]
    NoDriver(String),
    /// The control device cannot be opened.
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The driver did not answer the handshake as a driver does.
    #[error("{path} did not answer the version handshake ({what})")]
    NoAnswer { path: String, what: String },
}

/// Opens the control device, naming it in every error.
fn open_ctl(ctl: &Path) -> Result<std::fs::File, DetectError> {
    let path = ctl.display().to_string();
    match OpenOptions::new().read(true).write(true).open(ctl) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DetectError::NoDriver(path)),
        Err(source) => Err(DetectError::Open { path, source }),
    }
}

const QUERY: u8 = b'2';
const STRICT: u8 = 0;
const RECOGNIZED: u32 = 1;
const BLOCK: usize = std::mem::size_of::<nv_ioctl_rm_api_version_t>();

/// The version string of the driver behind `ctl` (`/dev/nvidiactl`).
///
/// # Errors
/// [`DetectError`], each naming the device.
pub fn host_driver_version(ctl: &Path) -> Result<String, DetectError> {
    let path = ctl.display().to_string();
    let f = open_ctl(ctl)?;
    // Query mode answers the version and checks nothing. Drivers before
    // 530.30.02 took '2' as a no-op: then a strict check with an empty
    // string fails, and the driver copies its own string back anyway.
    for cmd in [QUERY, STRICT] {
        let mut b = [0u8; BLOCK];
        b[0] = cmd;
        let r = sys::ioctl_block(
            f.as_fd(),
            canonical(esc::CHECK_VERSION_STR, BLOCK as u32),
            &mut b,
        );
        if let Err(e) = r
            && e != libc::EINVAL
        {
            return Err(DetectError::NoAnswer {
                path,
                what: std::io::Error::from_raw_os_error(e).to_string(),
            });
        }
        let reply = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if reply != RECOGNIZED {
            return Err(DetectError::NoAnswer {
                path,
                what: format!("reply {reply}"),
            });
        }
        let s = &b[8..];
        let end = s.iter().position(|c| *c == 0).unwrap_or(s.len());
        let v = String::from_utf8_lossy(&s[..end]).into_owned();
        if !v.is_empty() {
            return Ok(v);
        }
    }
    Err(DetectError::NoAnswer {
        path,
        what: "an empty version string".into(),
    })
}

/// One GPU the driver reports in `NV_ESC_CARD_INFO`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Card {
    /// The driver's id for it (what `NV_ESC_ATTACH_GPUS_TO_FD` names).
    pub gpu_id: u32,
    /// Its `/dev/nvidiaN` number.
    pub minor: u32,
    /// PCI address, `DDDD:BB:SS.F`.
    pub pci: String,
}

/// GPUs at most in one card-info answer (`NV_MAX_DEVICES`).
const MAX_CARDS: usize = 32;

/// The GPUs the driver behind `ctl` reports, valid entries only, in the
/// driver's order.
///
/// # Errors
/// [`DetectError`], each naming the device.
pub fn host_cards(ctl: &Path) -> Result<Vec<Card>, DetectError> {
    use crate::layout::{nv_ioctl_card_info_t as Info, nv_pci_info_t as Pci};
    const ENTRY: usize = std::mem::size_of::<Info>();
    let path = ctl.display().to_string();
    let f = open_ctl(ctl)?;
    let mut b = vec![0u8; ENTRY * MAX_CARDS];
    let size = u32::try_from(b.len()).unwrap_or(0);
    sys::ioctl_block(f.as_fd(), canonical(esc::CARD_INFO, size), &mut b).map_err(|e| {
        DetectError::NoAnswer {
            path: path.clone(),
            what: format!("card info: {}", std::io::Error::from_raw_os_error(e)),
        }
    })?;
    let valid = std::mem::offset_of!(Info, valid);
    let id = std::mem::offset_of!(Info, gpu_id);
    let minor = std::mem::offset_of!(Info, minor_number);
    let pci = std::mem::offset_of!(Info, pci_info);
    Ok(b.chunks(ENTRY)
        .filter(|e| e[valid] != 0)
        .map(|e| {
            let domain = crate::layout::read_u32(e, pci);
            let at = |field: usize| e.get(pci + field).copied().unwrap_or(0);
            let (bus, slot, function) = (
                at(std::mem::offset_of!(Pci, bus)),
                at(std::mem::offset_of!(Pci, slot)),
                at(std::mem::offset_of!(Pci, function)),
            );
            Card {
                gpu_id: crate::layout::read_u32(e, id),
                minor: crate::layout::read_u32(e, minor),
                pci: format!("{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"),
            }
        })
        .collect())
}
