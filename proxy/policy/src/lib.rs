//! fluxgate's traffic decisions, as plain functions and state over the config: which route a
//! request takes (`route`), which endpoint serves it and which are ejected (`balance`), and
//! whether a failed attempt is sent again (`retry`), and an order desk's pre-trade checks (`risk`). Breakers, rate limits and canary rules
//! join them here.
//!
//! Never does I/O and never touches a socket, a task or a request body; `balance` reads the
//! monotonic clock for latency averages and ejection times.

#![forbid(unsafe_code)]

pub mod balance;
pub mod breaker;
pub mod canary;
pub mod ratelimit;
pub mod retry;
pub mod risk;
pub mod route;
pub mod split;
