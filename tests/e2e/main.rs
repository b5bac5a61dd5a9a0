//! End-to-end tests: the real `oauthrelay` binary, over real sockets, driven
//! by our own SMTP client and by clients no one here wrote (Python's smtplib,
//! swaks, curl, msmtp), against fake Google services where delivery is
//! involved.

mod harness;

mod cli;
mod crash;
mod interop;
mod receive;

mod accounts;
mod delivery;
mod fakes;

mod faults;
mod load;
mod logs;
mod metrics;
mod served;
mod systemd;
mod torture;
