//! The `nbd` command: the NBD server's port and allow-list, its exports (every volume with
//! size, block size, access and trim), and the connected clients with their counters.

use core::fmt::Write;

use alloc::string::String;
use alloc::vec::Vec;

use nbd::{Cidr, ClientInfo, ExportCatalog, ExportInfo};

use crate::console::args::Args;
use crate::console::output::Out;
use crate::devices::Storage;
use crate::ipconfig::Dotted;
use crate::json;
use crate::nbd::backend::{self, StorageBackend};
use crate::nbd::Nbd;
use crate::net::Net;

struct Export {
    name: String,
    info: ExportInfo,
}

struct Client {
    info: ClientInfo,
    export: Option<String>,
}

/// Runs `nbd [--json]`.
pub fn run(args: &Args, out: &mut Out, st: &mut Storage, nbd: &Nbd, net: Option<&Net>) {
    let json_out = args.flag("json");
    let local = net.and_then(Net::address);
    let listening = nbd.listener.map(|l| l.port());
    let (config, counters, exports, clients) = {
        let backend = StorageBackend(st);
        let mut exports = Vec::new();
        let mut index = 0;
        while let Some(name) = backend.name(index) {
            index += 1;
            if let Some(info) = backend.lookup(name.as_str()) {
                exports.push(Export {
                    name: String::from(name.as_str()),
                    info,
                });
            }
        }
        let st = &*backend.0;
        let srv = &nbd.server;
        let mut clients = Vec::new();
        srv.clients(|info| {
            let export = info.export.map(|h| match backend::volume_name(st, h) {
                Some(name) => String::from(name.as_str()),
                None => String::from("(deleted snapshot)"),
            });
            clients.push(Client { info, export });
        });
        (*srv.config(), srv.counters(), exports, clients)
    };
    // Who may connect: the list, or the NIC's subnet.
    let (allow, default): (Vec<Cidr>, bool) = match &config.allow {
        Some(list) => (list.networks().copied().collect(), false),
        None => (
            local
                .map(|(a, p)| Cidr::network_of(a, p))
                .into_iter()
                .collect(),
            true,
        ),
    };
    let (accepted, refused) = counters;
    // `nbd.idle=` (0: sessions are never closed for idleness).
    let idle_s = config.idle_ns.map_or(0, |ns| ns / 1_000_000_000);
    if json_out {
        let text = json::object_string(|o| {
            o.u64("port", u64::from(config.port));
            o.bool("listening", listening.is_some());
            o.array("allow", |a| {
                for c in &allow {
                    a.str(&alloc::format!("{c}"));
                }
            });
            o.bool("allow_default", default);
            o.u64("accepted", accepted);
            o.u64("refused", refused);
            o.u64("idle_s", idle_s);
            o.array("exports", |a| {
                for e in &exports {
                    a.object(|x| {
                        x.str("name", &e.name);
                        x.u64("size", e.info.size);
                        x.u64("block_size", u64::from(e.info.block_size));
                        x.bool("read_only", e.info.read_only);
                        x.bool("writable", !e.info.read_only);
                        x.bool("flush", e.info.flush);
                        x.bool("fua", e.info.fua);
                        x.bool("trim", e.info.trim);
                        x.u64("max_payload", u64::from(e.info.max_payload));
                    });
                }
            });
            o.array("clients", |a| {
                for c in &clients {
                    a.object(|x| {
                        let (addr, port) = c.info.peer;
                        x.u64("id", u64::from(c.info.id));
                        x.str("peer", &alloc::format!("{}:{port}", Dotted(addr)));
                        x.opt_str("export", c.export.as_deref());
                        x.u64("requests", c.info.stats.requests);
                        x.u64("read_bytes", c.info.stats.read_bytes);
                        x.u64("written_bytes", c.info.stats.written_bytes);
                        x.u64("errors", c.info.stats.errors);
                        x.u64("in_flight", c.info.in_flight as u64);
                        x.u64("in_device", c.info.in_device as u64);
                        x.bool("closing", c.info.closing);
                    });
                }
            });
        });
        let _ = writeln!(out, "{text}");
        return;
    }
    let allow_text = if allow.is_empty() {
        String::from("nobody")
    } else {
        allow
            .iter()
            .map(|c| alloc::format!("{c}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let _ = writeln!(
        out,
        "nbd: {} TCP port {}; allow {allow_text}{}; {accepted} connections accepted, {refused} refused{}",
        if listening.is_some() {
            "listening on"
        } else {
            "not listening (no network) on"
        },
        config.port,
        if default {
            " (default: the local subnet)"
        } else {
            ""
        },
        match idle_s {
            0 => String::new(),
            s => alloc::format!("; idle sessions closed after {s} s"),
        },
    );
    let _ = writeln!(out, "exports:");
    if exports.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for e in &exports {
        let i = &e.info;
        let _ = writeln!(
            out,
            "  {:<16} {:>14} bytes  block {:<5} {:<10} {}{}{}",
            e.name,
            i.size,
            i.block_size,
            if i.read_only {
                "read-only"
            } else {
                "read-write"
            },
            if i.flush { "flush " } else { "" },
            if i.fua { "fua " } else { "" },
            if i.trim { "trim" } else { "" },
        );
    }
    let _ = writeln!(out, "clients:");
    if clients.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for c in &clients {
        let (addr, port) = c.info.peer;
        let s = c.info.stats;
        let _ = writeln!(
            out,
            "  #{} {}:{port} export {}: {} requests, {} bytes read, {} bytes written, {} errors, {} in flight{}",
            c.info.id,
            Dotted(addr),
            c.export.as_deref().unwrap_or("(handshake)"),
            s.requests,
            s.read_bytes,
            s.written_bytes,
            s.errors,
            c.info.in_flight,
            if c.info.closing { " (closing)" } else { "" },
        );
    }
}
