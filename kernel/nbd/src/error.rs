//! Why an NBD connection was closed by the server, or why the glue's call was refused. Each
//! value prints as one line for the log.

use core::fmt;

/// What was wrong. After any error but [`NbdError::BadCompletion`] the connection is closed
/// (a hard disconnect: the glue drops the TCP connection once its in-flight I/O is back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdError {
    /// The client set client flags we do not know or did not offer (the spec requires the
    /// server to drop the connection).
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    BadOptionMagic(u64),
    /// Option data longer than we are willing to read (`NBD_OPT_EXPORT_NAME` longer than we
    /// buffer, or any option longer than the skip limit).
    OptionTooLong {
        /// The option code.
        option: u32,
        /// Its data length.
        len: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (no error reply exists for
    /// this option: the spec requires the server to close).
    UnknownExport,
    /// `NBD_OPT_EXPORT_NAME` with a name that is not UTF-8.
    BadExportName,
    /// A transmission request did not start with `NBD_REQUEST_MAGIC`.
    BadRequestMagic(u32),
    /// A write announced more payload than any server has to accept (over 32 MiB, see the
    /// spec's "Size constraints": such a length may be treated as denial of service).
    WriteTooLarge(u32),
    /// The glue completed a slot that has no request waiting for a completion (a glue bug;
    /// the connection goes on).
    BadCompletion(u16),
    /// The connection is already closed.
    Closed,
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NbdError::BadClientFlags(flags) => {
                write!(f, "client sent unknown handshake flags {flags:#x}")
            }
            NbdError::BadOptionMagic(magic) => {
                write!(f, "option without IHAVEOPT magic (got {magic:#018x})")
            }
            NbdError::OptionTooLong { option, len } => {
                write!(
                    f,
                    "option {option} carries {len} bytes of data, over the limit"
                )
            }
            NbdError::UnknownExport => write!(f, "NBD_OPT_EXPORT_NAME: no such export"),
            NbdError::BadExportName => write!(f, "NBD_OPT_EXPORT_NAME: name is not UTF-8"),
            NbdError::BadRequestMagic(magic) => {
                write!(f, "request without NBD_REQUEST_MAGIC (got {magic:#010x})")
            }
            NbdError::WriteTooLarge(len) => {
                write!(f, "write of {len} bytes exceeds the 32 MiB payload limit")
            }
            NbdError::BadCompletion(slot) => {
                write!(f, "completion for slot {slot}, which awaits none")
            }
            NbdError::Closed => write!(f, "connection already closed"),
        }
    }
}
