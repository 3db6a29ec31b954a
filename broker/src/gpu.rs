//! Host GPUs for sandboxes: the driver's inventory, requests (`--gpu`,
//! `"gpus"`) resolved against it, and the grant a sandbox is built with.
//!
//! The inventory is asked of the driver itself (the version handshake and
//! `NV_ESC_CARD_INFO` on `nvidiactl`, see [`airlock_devproxy::detect`])
//! and completed from its procfs directory (UUID and model per PCI
//! address). Indices follow PCI bus order, as nvidia-smi numbers GPUs.

use std::path::{Path, PathBuf};

use airlock_devproxy::detect::{self, Card};
use airlock_devproxy::{AbiSet, VersionPolicy, abi::Selection};

use crate::api::types::GrantedGpu;
use crate::config::GpuConfig;

/// One GPU of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGpu {
    /// Index in PCI bus order.
    pub index: u32,
    /// The driver's card info.
    pub card: Card,
    /// `GPU UUID` from the driver's procfs, where it names one.
    pub uuid: Option<String>,
    /// `Model` from the driver's procfs.
    pub model: Option<String>,
    /// The GPU's procfs directory, where there is one.
    pub proc_dir: Option<PathBuf>,
}

impl HostGpu {
    /// Its PCI address: the procfs directory's name (the canonical form)
    /// where there is one, else the card info's.
    pub fn pci(&self) -> String {
        self.proc_dir
            .as_ref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_else(|| self.card.pci.clone())
    }
}

/// What the host's driver offers.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// The driver's version, from its handshake.
    pub version: String,
    /// Its GPUs, by index.
    pub gpus: Vec<HostGpu>,
}

/// A sandbox's GPUs, resolved and checked against the ABI tables.
#[derive(Debug, Clone)]
pub struct GpuGrant {
    /// The host driver's version.
    pub driver: String,
    /// Whether the tables are a newer release's of the same branch (the
    /// operator's opt-in), and whose.
    pub tables: String,
    /// Whether `tables` differs from `driver` by the operator's opt-in.
    pub newer_in_branch: bool,
    /// The granted GPUs, in the sandbox's order.
    pub gpus: Vec<HostGpu>,
    /// `nvidiactl`, `nvidia-uvm`, and the GPUs' host nodes.
    pub dev_dir: PathBuf,
    /// The sandbox's ioctl filter for these tables.
    pub filter: Vec<airlock_shim::spec::BpfInsn>,
}

impl GpuGrant {
    /// The grant as `GET /v1/sandboxes/{id}` shows it.
    pub fn granted(&self) -> Vec<GrantedGpu> {
        self.gpus
            .iter()
            .enumerate()
            .map(|(k, g)| GrantedGpu {
                inside: u32::try_from(k).unwrap_or(u32::MAX),
                index: g.index,
                uuid: g.uuid.clone(),
                pci: g.pci(),
                model: g.model.clone(),
                minor: g.card.minor,
            })
            .collect()
    }

    /// The devices a sandbox with this grant may open, as devices-cgroup
    /// rules: the minimal /dev (null, zero, full, random, urandom, tty),
    /// its own pseudo-terminals (ptmx 5:2, slaves 136-143), and the
    /// granted nodes that are character devices.
    pub fn device_rules(&self) -> Vec<String> {
        let char_dev = |p: &Path| -> Option<String> {
            let st = rustix::fs::stat(p).ok()?;
            (st.st_mode & libc::S_IFMT == libc::S_IFCHR).then(|| {
                let (major, minor) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                format!("c {major}:{minor}")
            })
        };
        let mut rules: Vec<String> = airlock_shim::plan::DEVICES
            .iter()
            .filter_map(|d| char_dev(&Path::new("/dev").join(d)))
            .collect();
        rules.push("c 5:2".into());
        rules.extend((136..=143).map(|m| format!("c {m}:*")));
        for (host, _) in self.nodes() {
            if let Some(r) = char_dev(&host) {
                rules.push(r);
            }
        }
        rules
    }

    /// `(host node, name in the sandbox's /dev)` for every node the
    /// sandbox gets.
    pub fn nodes(&self) -> Vec<(PathBuf, String)> {
        let mut v = vec![
            (self.dev_dir.join("nvidiactl"), "nvidiactl".to_string()),
            (self.dev_dir.join("nvidia-uvm"), "nvidia-uvm".to_string()),
        ];
        for (k, g) in self.gpus.iter().enumerate() {
            v.push((
                self.dev_dir.join(format!("nvidia{}", g.card.minor)),
                format!("nvidia{k}"),
            ));
        }
        v
    }
}

/// Files copied from the driver's procfs directory at most, and bytes
/// of each.
const PROC_FILES: usize = 64;
const PROC_FILE_BYTES: u64 = 64 << 10;

impl GpuGrant {
    /// Writes into `into` (created, 0755) the part of the driver's procfs
    /// directory `proc_dir` that concerns this grant: its top-level files
    /// (version, params, registry) and `gpus/PCI/` of the granted GPUs
    /// only, each file read-only. None when the host has no such
    /// directory.
    ///
    /// # Errors
    /// Creating or writing the copy.
    pub fn write_proc_view(
        &self,
        proc_dir: &Path,
        into: &Path,
    ) -> std::io::Result<Option<PathBuf>> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !proc_dir.is_dir() {
            return Ok(None);
        }
        let mkdir = |d: &Path| std::fs::DirBuilder::new().mode(0o755).create(d);
        mkdir(into)?;
        copy_files(proc_dir, into)?;
        let gpus = into.join("gpus");
        mkdir(&gpus)?;
        for g in &self.gpus {
            let (Some(dir), Some(name)) =
                (&g.proc_dir, g.proc_dir.as_ref().and_then(|d| d.file_name()))
            else {
                continue;
            };
            let to = gpus.join(name);
            mkdir(&to)?;
            copy_files(dir, &to)?;
        }
        std::fs::set_permissions(&gpus, std::fs::Permissions::from_mode(0o555))?;
        std::fs::set_permissions(into, std::fs::Permissions::from_mode(0o555))?;
        Ok(Some(into.to_path_buf()))
    }
}

/// Copies the regular files directly in `from` (procfs: sizes read as 0,
/// so each is read to its end, bounded) into `to`, read-only.
fn copy_files(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(from)?.flatten().take(PROC_FILES) {
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let mut text = Vec::new();
        let Ok(f) = std::fs::File::open(e.path()) else {
            continue;
        };
        if f.take(PROC_FILE_BYTES).read_to_end(&mut text).is_err() {
            continue;
        }
        let dest = to.join(e.file_name());
        std::fs::write(&dest, &text)?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444))?;
    }
    Ok(())
}

/// Why GPUs cannot be granted.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The operator turned GPUs off.
    #[error("GPUs are not offered by this broker (brokerd.toml [gpu] enabled = false)")]
    Disabled,
    /// No usable driver.
    #[error(transparent)]
    Driver(#[from] detect::DetectError),
    /// No table for the driver.
    #[error(transparent)]
    Abi(#[from] airlock_devproxy::AbiError),
    /// The request names GPUs wrongly.
    #[error("{0}")]
    Request(String),
    /// The tables do not make a filter.
    #[error("device proxy filter: {0}")]
    Filter(String),
}

/// Reads the host's GPUs.
///
/// # Errors
/// [`GpuError::Driver`] naming the device.
pub fn inventory(cfg: &GpuConfig) -> Result<Inventory, GpuError> {
    let ctl = cfg.dev_dir.join("nvidiactl");
    let version = detect::host_driver_version(&ctl)?;
    let cards = detect::host_cards(&ctl)?;
    let procs = read_proc(&cfg.proc_dir);
    let mut gpus: Vec<HostGpu> = cards
        .into_iter()
        .map(|card| {
            let p = procs.iter().find(|p| p.minor == Some(card.minor));
            HostGpu {
                index: 0,
                uuid: p.and_then(|p| p.uuid.clone()),
                model: p.and_then(|p| p.model.clone()),
                proc_dir: p.map(|p| p.dir.clone()),
                card,
            }
        })
        .collect();
    // PCI bus order, as nvidia-smi numbers GPUs; the procfs directory
    // name is the canonical address where the card info has none.
    let key = |g: &HostGpu| (g.pci(), g.card.minor);
    gpus.sort_by_key(key);
    for (i, g) in gpus.iter_mut().enumerate() {
        g.index = u32::try_from(i).unwrap_or(u32::MAX);
    }
    Ok(Inventory { version, gpus })
}

struct ProcGpu {
    dir: PathBuf,
    minor: Option<u32>,
    uuid: Option<String>,
    model: Option<String>,
}

/// `gpus/*/information` of the driver's procfs directory (absent: none).
fn read_proc(dir: &Path) -> Vec<ProcGpu> {
    let Ok(entries) = std::fs::read_dir(dir.join("gpus")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten().take(256) {
        let Ok(text) = std::fs::read_to_string(e.path().join("information")) else {
            continue;
        };
        let field = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        out.push(ProcGpu {
            dir: e.path(),
            minor: field("Device Minor").and_then(|m| m.parse().ok()),
            uuid: field("GPU UUID").filter(|u| u.starts_with("GPU-")),
            model: field("Model"),
        });
    }
    out
}

/// The CDI kind airlock answers to, as in `nvidia.com/gpu=0`.
const CDI_PREFIX: &str = "nvidia.com/gpu=";

/// Checks the form of GPU names in a request (before the host is asked).
///
/// # Errors
/// A message naming the first bad entry.
pub fn check_names(wanted: &[String]) -> Result<(), String> {
    if wanted.len() > 64 {
        return Err(format!(
            "gpus: {} entries; at most 64 may be named",
            wanted.len()
        ));
    }
    for w in wanted {
        let name = w.strip_prefix(CDI_PREFIX).unwrap_or(w);
        let ok = name == "all"
            || (!name.is_empty() && name.len() <= 10 && name.bytes().all(|b| b.is_ascii_digit()))
            || (name.starts_with("GPU-")
                && name.len() > 4
                && name.len() <= 64
                && name[4..]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'-'));
        if !ok {
            return Err(format!(
                "gpus: {w:?} is not a GPU name: use an index (0), a UUID (GPU-...), \
                 {CDI_PREFIX}INDEX|UUID or {CDI_PREFIX}all"
            ));
        }
    }
    Ok(())
}

/// The host GPUs `wanted` names, in its order.
///
/// # Errors
/// [`GpuError::Request`] naming the entry that does not resolve, and the
/// GPUs there are.
pub fn resolve(inv: &Inventory, wanted: &[String], max: usize) -> Result<Vec<HostGpu>, GpuError> {
    check_names(wanted).map_err(GpuError::Request)?;
    let there = || {
        if inv.gpus.is_empty() {
            "the host's driver reports no GPU".to_string()
        } else {
            let v: Vec<String> = inv
                .gpus
                .iter()
                .map(|g| match &g.uuid {
                    Some(u) => format!("{} ({u})", g.index),
                    None => g.index.to_string(),
                })
                .collect();
            format!("the host has {}", v.join(", "))
        }
    };
    let mut out: Vec<HostGpu> = Vec::new();
    for w in wanted {
        let name = w.strip_prefix(CDI_PREFIX).unwrap_or(w);
        let found: Vec<&HostGpu> = if name == "all" {
            inv.gpus.iter().collect()
        } else if let Ok(i) = name.parse::<u32>() {
            inv.gpus.iter().filter(|g| g.index == i).collect()
        } else {
            let lower = name.to_ascii_lowercase();
            let hits: Vec<&HostGpu> = inv
                .gpus
                .iter()
                .filter(|g| {
                    g.uuid
                        .as_ref()
                        .is_some_and(|u| u.to_ascii_lowercase().starts_with(&lower))
                })
                .collect();
            if hits.len() > 1 {
                return Err(GpuError::Request(format!(
                    "gpus: {w:?} names {} GPUs; give more of the UUID",
                    hits.len()
                )));
            }
            hits
        };
        if found.is_empty() {
            return Err(GpuError::Request(format!(
                "gpus: no GPU {w:?}: {}",
                there()
            )));
        }
        for g in found {
            if out.iter().any(|o| o.index == g.index) {
                return Err(GpuError::Request(format!(
                    "gpus: GPU {} is named twice",
                    g.index
                )));
            }
            out.push(g.clone());
        }
    }
    if out.len() > max {
        return Err(GpuError::Request(format!(
            "gpus: {} GPUs asked for; a sandbox may hold at most {max} (brokerd.toml [gpu] max_per_sandbox)",
            out.len()
        )));
    }
    Ok(out)
}

/// The built-in tables, parsed once.
fn abi_set() -> Result<&'static AbiSet, GpuError> {
    static SET: std::sync::OnceLock<Result<AbiSet, String>> = std::sync::OnceLock::new();
    SET.get_or_init(|| AbiSet::builtin().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| GpuError::Filter(e.clone()))
}

/// Resolves `wanted` on this host into a grant: the driver must be one
/// the tables serve (exactly, or a later release of a stable branch when
/// the operator allows it).
///
/// # Errors
/// [`GpuError`], each saying what to change.
pub fn grant(cfg: &GpuConfig, wanted: &[String]) -> Result<GpuGrant, GpuError> {
    if !cfg.enabled {
        return Err(GpuError::Disabled);
    }
    // The names' form was checked with the request (CreateSpec) and is
    // again by `resolve`.
    let inv = inventory(cfg)?;
    let set = abi_set()?;
    let policy = VersionPolicy {
        allow_newer_in_branch: cfg.allow_newer_in_branch,
    };
    let selection = set.select(&inv.version, policy)?;
    let newer_in_branch = matches!(selection, Selection::NewerInBranch(_));
    let abi = selection.abi();
    let filter = airlock_devproxy::filter::ioctl_filter(abi)
        .map_err(|e| GpuError::Filter(e.to_string()))?
        .into_iter()
        .map(|i| airlock_shim::spec::BpfInsn {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let gpus = resolve(&inv, wanted, cfg.max_per_sandbox)?;
    Ok(GpuGrant {
        driver: inv.version,
        tables: abi.version.to_string(),
        newer_in_branch,
        filter,
        gpus,
        dev_dir: cfg.dev_dir.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn inv() -> Inventory {
        let g = |index: u32, minor: u32, uuid: &str| HostGpu {
            index,
            card: Card {
                gpu_id: 0x100 * (minor + 1),
                minor,
                pci: format!("0000:{:02x}:00.0", index + 1),
            },
            uuid: Some(uuid.to_string()),
            model: None,
            proc_dir: None,
        };
        Inventory {
            version: "580.142".into(),
            gpus: vec![
                g(0, 2, "GPU-aaaa1111-0000"),
                g(1, 0, "GPU-aaaa2222-0000"),
                g(2, 1, "GPU-bbbb3333-0000"),
            ],
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn indices(r: Result<Vec<HostGpu>, GpuError>) -> Vec<u32> {
        r.unwrap().iter().map(|g| g.index).collect()
    }

    #[test]
    fn indices_uuids_and_cdi_names_resolve_in_the_order_given() {
        let i = inv();
        assert_eq!(indices(resolve(&i, &names(&["2", "0"]), 8)), [2, 0]);
        assert_eq!(
            indices(resolve(&i, &names(&["GPU-bbbb", "nvidia.com/gpu=1"]), 8)),
            [2, 1]
        );
        assert_eq!(
            indices(resolve(&i, &names(&["nvidia.com/gpu=all"]), 8)),
            [0, 1, 2]
        );
        assert_eq!(
            indices(resolve(&i, &names(&["nvidia.com/gpu=GPU-AAAA2222"]), 8)),
            [1]
        );
    }

    #[test]
    fn bad_names_are_refused_with_what_was_wrong() {
        let i = inv();
        let err = |w: &[&str]| resolve(&i, &names(w), 8).unwrap_err().to_string();
        assert!(err(&["3"]).contains("no GPU \"3\""), "{}", err(&["3"]));
        assert!(err(&["3"]).contains("0 (GPU-aaaa1111-0000)"));
        assert!(err(&["GPU-aaaa"]).contains("names 2 GPUs"));
        assert!(err(&["0", "nvidia.com/gpu=0"]).contains("named twice"));
        assert!(err(&["../0"]).contains("not a GPU name"));
        assert!(err(&["MIG-1"]).contains("not a GPU name"));
        assert!(err(&["-1"]).contains("not a GPU name"));
        assert!(
            resolve(&i, &names(&["all"]), 2)
                .unwrap_err()
                .to_string()
                .contains("max_per_sandbox")
        );
    }
}
