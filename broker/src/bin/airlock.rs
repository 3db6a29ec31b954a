//! airlock: run commands in sandboxes.

fn main() {
    airlock_broker::dispatch_internal_role();
    airlock_broker::harden_process();
    std::process::exit(airlock_broker::cli::main());
}
