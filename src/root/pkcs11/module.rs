//! PKCS#11 modules are loaded and `C_Initialize`d once per process, shared
//! by every root that uses them. A generation counter and a gate let a
//! profile that needs it (SoftHSM2) re-initialize the module to recover from
//! a lost token without a call racing it.

use crate::root::{RootError, RootErrorKind};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

/// One loaded, initialized module.
pub struct Module {
    path: PathBuf,
    pub(super) ctx: Pkcs11,
    /// Generation of the current initialization; calls hold a read guard.
    gate: RwLock<u64>,
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn init_args() -> CInitializeArgs {
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

impl Module {
    /// The module at `path`, loaded and initialized on first use.
    pub fn get(path: &Path) -> Result<Arc<Self>, RootError> {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = reg.get(path) {
            return Ok(Arc::clone(m));
        }
        let cfg = |msg: String| RootError::new(RootErrorKind::Config, msg);
        let ctx = Pkcs11::new(path).map_err(|e| {
            cfg(format!(
                "cannot load PKCS#11 module {}: {e}",
                path.display()
            ))
        })?;
        match ctx.initialize(init_args()) {
            Ok(()) => {}
            // Another library in this process initialized it already.
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::CryptokiAlreadyInitialized,
                _,
            )) => {}
            Err(e) => {
                return Err(cfg(format!(
                    "C_Initialize of {} failed: {e}",
                    path.display()
                )))
            }
        }
        let m = Arc::new(Self {
            path: path.to_owned(),
            ctx,
            gate: RwLock::new(0),
        });
        reg.insert(path.to_owned(), Arc::clone(&m));
        Ok(m)
    }

    /// Holds off re-initialization for the duration of a call.
    pub fn enter(&self) -> RwLockReadGuard<'_, u64> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `C_Finalize` + `C_Initialize`, unless someone else already did it
    /// since `seen`. Invalidates every session of this module in the process.
    pub fn reinitialize(&self, seen: u64) -> Result<(), RootError> {
        let mut g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if *g != seen {
            return Ok(());
        }
        let _ = self.ctx.clone().finalize();
        self.ctx.initialize(init_args()).map_err(|e| {
            RootError::new(
                RootErrorKind::Unavailable,
                format!(
                    "re-initializing PKCS#11 module {} failed: {e}",
                    self.path.display()
                ),
            )
        })?;
        *g += 1;
        tracing::warn!(module = %self.path.display(), generation = *g, "PKCS#11 module re-initialized to recover the token");
        Ok(())
    }
}
