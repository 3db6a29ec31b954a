#!/usr/bin/env python3
"""Generate devproxy/abi/abi.json from the NVIDIA ABI facts.

  python3 devproxy/tools/gen_abi.py [FACTS] [--check]

FACTS defaults to ../shared/nvidia-abi/abi-facts.json beside the checkout.
The output is a version tree, as the driver's history is: the oldest version
carries full tables, each later one only what changed from its parent
(`set` replaces or adds entries by key, `remove` drops keys). Every version
records a digest (FNV-1a) of its full tables, which the crate recomputes after
applying the deltas. `--check` regenerates into memory and fails if the
committed file differs.

What is kept per version (facts only, no driver code):
  escapes   every frontend and RM escape: nr, name, node, size rule,
            whether the allowlist admits it
  uvm       every UVM ioctl number: name, parameter size, whether routed
            by the driver and admitted by the allowlist
  classes   admitted RM alloc classes with the driver's param size
  controls  admitted RM control commands with the registered param size,
            whether the params embed pointers or fds, and for those whose
            handler's shape is known, how to marshal them (`marshal`)
  layouts   the top-level field layout of the structs the crate mirrors
The allowlist is the set a widely used proxy applies for that version,
intersected with what the driver's own headers define.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "devproxy", "abi", "abi.json")
DEFAULT_FACTS = os.path.join(os.path.dirname(ROOT), "shared", "nvidia-abi", "abi-facts.json")

# Version tree, parent first (the driver's git ancestry for these tags).
ORDER = ["535.288.01", "550.90.12", "570.195.03", "580.105.08", "580.142", "590.48.01"]

# Structs the crate mirrors as repr(C) types (src/layout.rs).
MIRRORED = [
    "NVOS00_PARAMETERS", "NVOS21_PARAMETERS", "NVOS54_PARAMETERS", "NVOS64_PARAMETERS",
    "NVOS55_PARAMETERS", "NVOS57_PARAMETERS", "NVOS33_PARAMETERS",
    "nv_ioctl_xfer_t", "nv_ioctl_rm_api_version_t", "nv_ioctl_card_info_t",
    "nv_ioctl_register_fd_t", "nv_ioctl_alloc_os_event_t", "nv_ioctl_free_os_event_t",
    "nv_ioctl_nvos33_parameters_with_fd", "nv_ioctl_sys_params_t",
    "nv_ioctl_wait_open_complete_t", "UVM_INITIALIZE_PARAMS", "UVM_MM_INITIALIZE_PARAMS",
    "NVOS02_PARAMETERS", "NVOS32_PARAMETERS", "NVOS34_PARAMETERS",
    "nv_ioctl_nvos02_parameters_with_fd", "RS_ACCESS_MASK",
]

# Alloc classes whose params are a plain block (or none): the only ones a
# proxy can forward by copying `param_size` bytes. The first three are the
# simple handlers; the rest have handlers of their own in that proxy only to
# record the objects their params name (it keeps its own object tree): the
# facts' complete list of pointers and fds in alloc params (design notes
# 1.6: NV0005's `data` for OS events, the IMEX session's and the multicast
# fabric's) names none of theirs, and RM resolves the handles they name in
# the caller's own client.
PLAIN_ALLOC = ("rmAllocSimple", "rmAllocNoParams", "rmAllocRootClient",
               "rmAllocContextDMA", "rmAllocMemoryVirtual", "rmAllocContextShare",
               "rmAllocChannelGroup", "rmAllocChannel")


# How the params of an embedded-pointer control are marshalled, by the
# handler a widely used proxy gives it (the facts name it; the driver's own
# embedded_param_copy.c copies the same shapes): the element count field,
# then each pointer with the bytes of one element it points at. Field names
# are checked against the version's layout, so a changed struct fails here.
#   ctrlGetNvU32List       count, NvU32 list          (GET_CLASSLIST, GET_ENGINES)
#   ctrlIoctlHasInfoList   count, {index, data} list  (the V1 *_GET_INFO controls)
#   ctrlDevGetCaps         byte count, NvU8 table     (*_GET_CAPS)
#   ctrlDevFIFOGetChannelList  count, two NvU32 lists
#   ctrlClientSystemGetBuildVersion  string size, three char buffers
#   ctrlGpuGetIDInfo       no list; the unused szName pointer goes NULL
#   ctrlHasFrontendFD[..]  no pointer; `fd` names an nvidia node of the caller
# Any other handler (register ops, debugger memory, P2P caps, multicast
# fabric, channel disabling) stays refused: no `marshal`.
MARSHAL = {
    "ctrlGetNvU32List": (0, [(1, 4)]),
    "ctrlIoctlHasInfoList": (0, [(1, 8)]),
    "ctrlDevGetCaps": (0, [(1, 1)]),
    "ctrlDevFIFOGetChannelList": (0, [(1, 4), (2, 4)]),
    "ctrlClientSystemGetBuildVersion": (0, [(1, 1), (2, 1), (3, 1)]),
}
DEPENDENCY_ONLY_CONTROLS = ("ctrlRegisterVASpace",)
COUNT_NAMES = ("numClasses", "engineCount", "capsTblSize", "numChannels", "sizeOfStrings")


def marshal_of(c, layout):
    """The marshalling rule of embedded control `c` with params `layout`
    (this version's), or None when it stays refused."""
    if layout is None:
        return None
    handler = c["gvisor_handler"].split("[")[0]
    fields = layout["fields"]
    names = {f[0]: f for f in fields}
    if handler in MARSHAL:
        count_idx, arrays = MARSHAL[handler]
        name, at, size = fields[count_idx]
        assert size == 4 and (name in COUNT_NAMES or name.endswith("ListSize")), (c["name"], name)
        out = []
        for idx, elem in arrays:
            pname, pat, psize = fields[idx]
            assert psize == 8 and pat % 8 == 0, (c["name"], pname)
            assert pname.endswith(("List", "Tbl", "Buffer")), (c["name"], pname)
            out.append([pat, elem])
        return {"count": [at, size], "arrays": out, "null": [], "fds": [], "client": None}
    if handler == "ctrlGpuGetIDInfo":
        name, at, size = names["szName"]
        assert size == 8
        return {"count": None, "arrays": [], "null": [at], "fds": [], "client": None}
    if handler == "ctrlHasFrontendFD":
        name, at, size = names["fd"]
        assert size == 4
        return {"count": None, "arrays": [], "null": [], "fds": [[at, 4]], "client": None}
    return None


def alloc_marshal_of(c, layout):
    """The marshalling rule of alloc class `c` whose params are not plain,
    or None when it stays refused. Only the OS event (NV01_EVENT_OS_EVENT):
    `data` holds an fd of the caller (on which NV_ESC_ALLOC_OS_EVENT made
    the event queue), and the event is for a resource of `hParentClient`,
    which must be the caller's own client."""
    if c["gvisor_handler"] != "rmAllocEventOSEvent" or layout is None:
        return None
    names = {f[0]: f for f in layout["fields"]}
    _, data_at, data_size = names["data"]
    _, client_at, client_size = names["hParentClient"]
    assert data_size == 8 and client_size == 4
    return {"count": None, "arrays": [], "null": [], "fds": [[data_at, 8]],
            "client": client_at}


def node_of(device):
    if device.startswith("ctl (event classes"):
        return "ctl_or_event"
    return {"ctl": "ctl", "dev": "gpu", "any": "any", "n/a": "none"}[device]


def size_of(e):
    rule = e["size_rule"]
    sizes = sorted(set(e["sizes"].values()))
    if rule == "exact":
        return {"exact": sizes[0]}
    if rule == "one_of":
        return {"one_of": sizes}
    if rule == "array":
        return {"array": e["element_size"]}
    if rule == "at_least":
        return {"at_least": sizes[0]}
    return {"none": True}


def tables(v, layouts):
    escapes = {}
    for e in v["frontend_escapes"] + v["rm_escapes"]:
        escapes[str(e["nr"])] = {
            "nr": e["nr"], "name": e["name"], "node": node_of(e["device"]),
            "size": size_of(e), "allowed": e["gvisor"] is not None,
        }
    uvm = {}
    for u in v["uvm_ioctls"]:
        uvm[str(u["number"])] = {
            "number": u["number"], "name": u["name"], "size": u["size"],
            "routed": u["dispatch"] is not None, "allowed": u["gvisor"] is not None,
        }
    classes = {}
    ver = v["constants"]["NV_VERSION_STRING"]
    for c in v["gvisor_alloc_classes"]:
        drv = c.get("driver_resource_list") or {}
        if not drv:
            continue  # not defined by the driver at this version
        entry = {
            "class": int(c["class_id"], 16), "name": c["name"],
            "param_size": drv.get("param_size") or 0,
            "required": bool(drv.get("required")),
            "plain": c["gvisor_handler"].startswith(PLAIN_ALLOC),
        }
        if not entry["plain"] and drv.get("param_struct"):
            layout = next((x for x in layouts.get(drv["param_struct"], [])
                           if ver in x["versions"]), None)
            m = alloc_marshal_of(c, layout)
            if m is not None:
                assert layout["size"] == entry["param_size"], c["name"]
                entry["marshal"] = m
        classes[c["class_id"]] = entry
    controls = {}
    driver_embedded = {int(x[1], 16) for x in v["driver_controls_with_embedded_pointers"]
                       if isinstance(x[1], str)}
    for c in v["gvisor_control_commands"]:
        drv = c.get("driver_exported")
        size = drv["param_size"] if drv else c.get("gvisor_struct_size")
        if size is None:
            continue
        embedded = bool(c.get("embedded_pointers_or_fds")) \
            or c["gvisor_handler"] != "rmControlSimple"
        # A handler there only to record the object the params name, for a
        # control the driver's own list of embedded-pointer controls does
        # not hold: its params are plain data (a VA-space token).
        if c["gvisor_handler"] in DEPENDENCY_ONLY_CONTROLS \
                and int(c["cmd"], 16) not in driver_embedded:
            embedded = False
        entry = {
            "cmd": int(c["cmd"], 16), "name": c["name"], "param_size": size,
            "embedded": embedded,
        }
        if embedded and c.get("gvisor_struct"):
            layout = next((x for x in layouts.get(c["gvisor_struct"][0], [])
                           if ver in x["versions"]), None)
            m = marshal_of(c, layout)
            if m is not None:
                assert layout["size"] == size, (c["name"], layout["size"], size)
                entry["marshal"] = m
        controls[c["cmd"]] = entry
    lay = {}
    for name in MIRRORED:
        for variant in layouts.get(name, []):
            if v["constants"]["NV_VERSION_STRING"] in variant["versions"]:
                lay[name] = {"size": variant["size"], "align": variant["align"],
                             "fields": variant["fields"]}
    return {"escapes": escapes, "uvm": uvm, "classes": classes, "controls": controls,
            "layouts": lay}


def digest(t):
    """The crate computes the same: FNV-1a (64 bit) of the canonical JSON of
    the full tables (sorted keys, no spaces), as 16 hex digits."""
    canon = json.dumps(t, sort_keys=True, separators=(",", ":")).encode()
    h = 0xCBF29CE484222325
    for b in canon:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def delta(parent, child):
    out = {"set": {}, "remove": {}}
    for k in child:
        s = {key: val for key, val in child[k].items() if parent[k].get(key) != val}
        r = sorted(key for key in parent[k] if key not in child[k])
        if s:
            out["set"][k] = s
        if r:
            out["remove"][k] = r
    return out


def generate(facts_path):
    facts = json.load(open(facts_path))
    layouts = facts["struct_layouts"]
    out = {"_about": "Generated by devproxy/tools/gen_abi.py from the NVIDIA ABI facts "
                     "(driver headers at each tag, x86_64; allowlists per version). "
                     "Do not edit by hand.",
           "versions": []}
    prev = None
    for ver in ORDER:
        t = tables(facts["versions"][ver], layouts)
        entry = {"version": ver, "parent": ORDER[ORDER.index(ver) - 1] if prev else None,
                 "digest": digest(t)}
        if prev is None:
            entry["set"] = t
            entry["remove"] = {}
        else:
            entry.update(delta(prev, t))
        out["versions"].append(entry)
        prev = t
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    facts = args[0] if args else DEFAULT_FACTS
    text = generate(facts)
    if "--check" in sys.argv:
        if open(OUT).read() != text:
            sys.exit(f"{OUT} is stale: run devproxy/tools/gen_abi.py")
        print("abi.json is up to date")
        return
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
