//! The client's stream: plain, or TLS after STARTTLS (`netstream`, the
//! one plain-or-TLS type of the workspace).

pub(crate) use netstream::Stream as Conn;
