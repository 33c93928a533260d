//! The serial console. Its pure logic builds and is tested on the host: the line editor turns
//! terminal bytes into command lines (`editor`), and `args` splits a line into words and
//! checks them against a command's options and arguments. `output` (appliance only) is the
//! console's output: command output, and log lines printed above the prompt, which is all
//! the logger needs of the console. The main loop (`main_loop.rs`) feeds the editor and
//! runs the commands (`crate::shell`).
pub mod args;
pub mod editor;
#[cfg(target_os = "none")]
pub mod output;
