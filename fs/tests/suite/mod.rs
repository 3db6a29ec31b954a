pub mod common;
mod host;
mod layers;
mod workspace;
