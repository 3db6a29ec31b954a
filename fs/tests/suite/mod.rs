pub mod common;
mod host;
mod layers;
mod links;
mod passthrough;
mod snapshots;
mod workspace;
