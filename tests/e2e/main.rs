//! End-to-end tests: the real `oauthrelay` binary, over real sockets, driven
//! by our own SMTP client and by clients no one here wrote (Python's smtplib,
//! swaks, curl, msmtp), against fake Google services where delivery is
//! involved.

// println! is forbidden in the binary's code (crates/oauthrelay/clippy.toml:
// it panics on a closed stdout); test output is another matter.
#![allow(clippy::disallowed_macros)]

mod harness;

mod cli;
mod cli_polish;
mod crash;
mod docs;
mod interop;
mod pipes;
mod printers;
mod receive;
mod sendmail;

mod accounts;
mod delivery;
mod delivery_log;
mod disk;
mod fakes;
mod gmail_api;

mod faults;
mod load;
mod logs;
mod metrics;
mod microsoft;
mod postmaster;
mod served;
mod status;
mod systemd;
mod torture;
mod upgrade;
