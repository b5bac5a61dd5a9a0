//! Standard output of the one-shot commands.
//!
//! `println!` panics when stdout is a pipe whose reader has gone
//! (`oauthrelay queue list | head -1`), because Rust ignores SIGPIPE. The
//! commands print through [`outln!`]/[`out!`] and [`Stdout`] instead: when
//! the reader has gone, the program ends the way a C program (postqueue,
//! git, coreutils) does, killed by SIGPIPE, so a shell sees status 141 and
//! prints nothing; `set -o pipefail` scripts get what they get from any other
//! tool. Any other write error (a full disk behind `>`) is reported on
//! stderr and ends the program with EX_IOERR (74).
//!
//! SIGPIPE stays ignored for everything else: sockets (the control socket,
//! HTTPS, SMTP) report a closed peer as an error the code handles.
//! `clippy.toml` forbids `print!`/`println!` in this crate.

use std::io::{self, Write};

/// sysexits: an error writing output.
const EX_IOERR: i32 = 74;

/// The reader of stdout has gone: die of SIGPIPE, quietly.
pub fn reader_gone() -> ! {
    // SAFETY: signal(2) and raise(3) with constant arguments; the default
    // action of SIGPIPE terminates the process, which is what we want.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    // Only if SIGPIPE is blocked: the status a shell would show.
    std::process::exit(128 + libc::SIGPIPE)
}

fn failed(e: io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        reader_gone();
    }
    // If stderr is gone too there is no one left to tell.
    let _ = writeln!(
        io::stderr(),
        "oauthrelay: cannot write to standard output: {e}"
    );
    std::process::exit(EX_IOERR)
}

/// Stdout whose writes never return an error: a gone reader or a failed
/// write ends the program as described above. Pass it where a `Write` is
/// wanted. (Not a lock: it may be held across an `.await`.)
pub struct Stdout(io::Stdout);

impl Stdout {
    pub fn new() -> Self {
        Stdout(io::stdout())
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => failed(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0.flush() {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => failed(e),
        }
    }
}

impl Drop for Stdout {
    fn drop(&mut self) {
        // What the line buffer still holds (output without a final
        // newline) meets the same rules, not a silent loss at exit.
        let _ = self.flush();
    }
}

/// Write formatted text to stdout and flush it.
pub fn print(args: std::fmt::Arguments<'_>) {
    let mut out = Stdout::new();
    let _ = out.write_fmt(args);
    let _ = out.flush();
}

/// `println!` for the commands (see the module docs).
macro_rules! outln {
    () => {
        $crate::out::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the commands (see the module docs).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::print(format_args!($($arg)*))
    };
}

pub(crate) use {out, outln};
