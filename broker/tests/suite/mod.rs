pub mod harness;

mod api;
mod escape;
mod files;
mod fs;
mod gpu;
mod hostile;
mod lifecycle;
mod limits;
mod mcp;
mod net;
mod root;
mod run;
mod sdk;
mod snapshots;
mod tty;
