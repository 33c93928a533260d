//! The serial console's pure logic, built and tested on the host: the line editor turns
//! terminal bytes into command lines (`editor`), and `args` splits a line into words and
//! checks them against a command's options and arguments. The shell (`crate::shell`) wires
//! both to the UART and runs the commands.
pub mod args;
pub mod editor;
