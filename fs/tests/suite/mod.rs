pub mod common;
mod host;
mod layers;
mod links;
mod passthrough;
mod snapshots;
mod walks;
mod workspace;
