//! Process hardening at start: no core dumps and no ptrace attach by other
//! processes of the same user, so key material in memory does not end up in
//! a core file or a debugger. Through rustix (safe wrappers; `unsafe` stays
//! forbidden here).

/// Disables core dumps (RLIMIT_CORE = 0) and marks the process
/// non-dumpable (PR_SET_DUMPABLE 0), which also refuses ptrace attach by
/// non-root processes and makes /proc/self/mem unreadable to them.
pub fn harden_process() -> std::io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Raises the open-file limit to its hard maximum: each connection is a
/// file descriptor, and `[limits] connections` should bind, not the default
/// soft limit (often 1024).
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    )?;
    Ok(l.maximum.unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use rustix::process::{dumpable_behavior, getrlimit, DumpableBehavior, Resource};

    #[test]
    fn the_process_becomes_non_dumpable_without_core_files() {
        super::harden_process().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
        let core = getrlimit(Resource::Core);
        assert_eq!((core.current, core.maximum), (Some(0), Some(0)));
    }
}
