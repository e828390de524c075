//! Process hardening applied before any key is loaded: no core dumps (a dump would contain
//! the volume key), and not dumpable (ptrace by same-uid processes refused, /proc/PID/mem
//! closed).

/// Disables core dumps for this process. Returns what was achieved, for a log line.
pub fn disable_core_dumps() -> Result<(), String> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })
        .map_err(|e| format!("setrlimit(RLIMIT_CORE): {e}"))?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| format!("prctl(PR_SET_DUMPABLE): {e}"))?;
    Ok(())
}

/// Whether core dumps are off (RLIMIT_CORE hard and soft limits are 0).
pub fn core_dumps_disabled() -> bool {
    let r = rustix::process::getrlimit(rustix::process::Resource::Core);
    r.current == Some(0) && r.maximum == Some(0)
}
