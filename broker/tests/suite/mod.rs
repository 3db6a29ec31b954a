pub mod harness;

mod api;
mod escape;
mod fs;
mod lifecycle;
mod limits;
mod run;
