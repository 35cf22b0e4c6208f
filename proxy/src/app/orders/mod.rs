//! Order entry (issue #16): orders and cancels from trading clients, decoded and validated,
//! checked against their account's limits, journaled (group commit) before the client hears
//! they were accepted, delivered to the order upstream their desk's rules pick, and the
//! upstream's answer relayed. After a crash, the journal's unsettled orders are sent again.
//!
//! `desk`: the state every worker shares (accounts, remembered orders, the journal thread);
//! `session`: the connections and the tasks of accepted orders; `journal`: the on-disk log.

pub(crate) mod desk;
pub mod journal;
pub(crate) mod session;
