pub mod common;
mod host;
mod layers;
mod links;
mod workspace;
