//! The control plane: config generations and how a reload builds and hands them to the
//! workers, and the admin listener. Never on a request's path.

pub(crate) mod admin;
pub(crate) mod reload;
pub(crate) mod status;
