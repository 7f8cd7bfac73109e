//! What the kernel connection keeps after the handover: rustls'
//! `KernelConnection` for KeyUpdates and late session tickets, and the
//! key-update decisions both phases use.

use std::io::{self};

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

use crate::mesh::record::{self, Keys};

/// What rustls keeps after the handover: it derives the next traffic
/// secrets for a KeyUpdate and takes a client's late session tickets.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
    /// A late NewSessionTicket; only a client takes one.
    fn ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(payload),
            Kernel::Server(_) => Err(rustls::Error::General(
                "a client sent a session ticket".into(),
            )),
        }
    }
}

/// The kernel connection, shared by both directions of a relay.
pub(crate) struct KernelShared {
    /// A std Mutex: a secret derivation, no `.await` inside.
    pub(crate) conn: std::sync::Mutex<Kernel>,
    /// The peer asked for our KeyUpdate (update_requested): sent before
    /// our next record.
    pub(crate) tx_update: std::sync::atomic::AtomicBool,
}

impl KernelShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kernel> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handles the handshake messages of one record on an established tunnel
/// (RFC 8446 §4.6): a KeyUpdate switches `rx` to the next secret (and, if
/// the peer asks, schedules ours); a NewSessionTicket goes to rustls.
/// Anything else is refused with unexpected_message.
pub(crate) fn on_handshake(
    mut msgs: &[u8],
    rx: &mut Keys,
    kernel: Option<&KernelShared>,
) -> io::Result<()> {
    let Some(k) = kernel else {
        return Err(record::refused(
            record::alert::UNEXPECTED_MESSAGE,
            "mesh: unexpected handshake message on an established tunnel",
        ));
    };
    while !msgs.is_empty() {
        let [ty, a, b, c, rest @ ..] = msgs else {
            return Err(record::refused(
                record::alert::DECODE_ERROR,
                "mesh: a handshake message split across records",
            ));
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(record::refused(
                record::alert::DECODE_ERROR,
                "mesh: a handshake message split across records",
            ));
        }
        let (body, next) = rest.split_at(len);
        msgs = next;
        match *ty {
            record::KEY_UPDATE => {
                let requested = match body {
                    [0] => false,
                    [1] => true,
                    _ => {
                        return Err(record::refused(
                            record::alert::DECODE_ERROR,
                            "mesh: a malformed KeyUpdate",
                        ));
                    }
                };
                // RFC 8446 §5.1: a KeyUpdate ends its record.
                if !msgs.is_empty() {
                    return Err(record::refused(
                        record::alert::UNEXPECTED_MESSAGE,
                        "mesh: data after a KeyUpdate in its record",
                    ));
                }
                let (seq, secrets) = k.lock().update_rx().map_err(io::Error::other)?;
                *rx = Keys::new(seq, secrets)?;
                if requested {
                    k.tx_update
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            record::NEW_SESSION_TICKET => {
                k.lock().ticket(body).map_err(|e| {
                    record::refused(
                        record::alert::UNEXPECTED_MESSAGE,
                        if matches!(e, rustls::Error::General(_)) {
                            "mesh: a client sent a session ticket"
                        } else {
                            "mesh: a malformed session ticket"
                        },
                    )
                })?;
            }
            _ => {
                return Err(record::refused(
                    record::alert::UNEXPECTED_MESSAGE,
                    "mesh: unexpected handshake message on an established tunnel",
                ));
            }
        }
    }
    Ok(())
}

/// Whether this side must send a KeyUpdate before its next record: the
/// peer asked, or the key has sealed half of its confidentiality limit.
pub(crate) fn tx_update_due(tx: &Keys, kernel: Option<&KernelShared>) -> bool {
    let Some(k) = kernel else { return false };
    tx.used() >= tx.update_at()
        || k.tx_update
            .swap(false, std::sync::atomic::Ordering::Relaxed)
}

/// Seals a KeyUpdate (update_not_requested) with the current key into
/// `out`, then moves `tx` to the next secret.
pub(crate) fn push_key_update(
    tx: &mut Keys,
    kernel: &KernelShared,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    record::push_record(
        tx,
        out,
        &[record::KEY_UPDATE, 0, 0, 1, 0],
        record::HANDSHAKE,
    )?;
    let (seq, secrets) = kernel.lock().update_tx().map_err(io::Error::other)?;
    *tx = Keys::new(seq, secrets)?;
    Ok(())
}
