//! Order entry (issue #16). So far its durable journal: accepted orders are journaled, with
//! group commit, before a client is told they were accepted, and come back after a crash.

pub mod journal;
