//! The Conductor's admin API client lives in `net::admin` (remote clients
//! find a module's workers through it too); the CLI's own helpers are here.

pub use net::admin::*;

/// How a module state is shown: `[:running]`.
pub fn shown(state: &str) -> String {
    format!("[:{state}]")
}
