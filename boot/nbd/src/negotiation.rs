//! Option negotiation (fixed newstyle), free of sockets: one decoded option in, the
//! reply bytes and the next step out.

use bytes::BytesMut;
use osstream_core::{
    AttachRequest, Attachment, DynSource, ErrorKind, ExportName, Exports, Intent,
    loggable_export_name,
};

use crate::proto::{
    self, BASE_ALLOCATION, BASE_ALLOCATION_ID, ClientOption, info, opt, rep, tflag,
};
use crate::refusals::Refusals;

/// Why a handshake ended when the client left cleanly (as `nbdinfo --list` does).
pub(crate) const CLIENT_ABORTED: &str = "client sent NBD_OPT_ABORT";
/// Why a handshake ended when its export was refused (the refusal is logged already).
pub(crate) const EXPORT_REFUSED: &str = "export refused";

/// What the connection does after an option.
pub(crate) enum Step {
    /// Read the next option.
    Continue,
    /// Close the connection (after sending the replies).
    Close(&'static str),
    /// Enter transmission on this export.
    Transmit(Box<Attached>),
    /// `STARTTLS` was accepted (its reply is in the output): run the TLS handshake, then
    /// negotiate again from a fresh state.
    StartTls,
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsPhase {
    /// The server has no TLS (or this is a unix socket): `STARTTLS` is refused.
    Unavailable,
    /// The client may upgrade, or go on in clear.
    Offered,
    /// Nothing but `STARTTLS` (or `ABORT`) until the client upgrades.
    Required,
    /// The connection is encrypted.
    Active,
}

/// An export a client has attached to, with what was negotiated for it.
#[derive(Debug)]
pub(crate) struct Attached {
    pub attachment: Attachment,
    pub flags: u16,
    pub structured: bool,
    pub base_allocation: bool,
}

/// What the server offers every connection's negotiation.
#[derive(Clone, Copy)]
pub(crate) struct Offer<'a> {
    pub exports: &'a Exports,
    /// Where refused exports are logged, once per repeat window.
    pub refusals: &'a Refusals,
    pub base_exports: bool,
    pub default_export: Option<&'a str>,
    pub max_request: u32,
}

/// Negotiation state of one connection.
pub(crate) struct Negotiation<'a> {
    offer: Offer<'a>,
    peer: &'a str,
    pub no_zeroes: bool,
    structured: bool,
    /// Export name for which `base:allocation` was selected, if any.
    meta_for: Option<String>,
    tls: TlsPhase,
}

/// Transmission flags for a source: exactly what its capability says.
pub(crate) fn transmission_flags(source: &DynSource, structured: bool) -> u16 {
    let cap = source.capability();
    let mut flags = tflag::HAS_FLAGS | tflag::SEND_CACHE;
    if !cap.write {
        flags |= tflag::READ_ONLY;
    }
    if cap.write && cap.flush {
        flags |= tflag::SEND_FLUSH;
    }
    if cap.write && cap.fua {
        flags |= tflag::SEND_FUA;
    }
    if cap.write && cap.trim {
        flags |= tflag::SEND_TRIM;
    }
    if cap.write && cap.write_zeroes {
        flags |= tflag::SEND_WRITE_ZEROES;
    }
    if cap.multi_conn {
        flags |= tflag::CAN_MULTI_CONN;
    }
    if cap.rotational {
        flags |= tflag::ROTATIONAL;
    }
    if structured {
        // Every read reply is one chunk, so "don't fragment" always holds.
        flags |= tflag::SEND_DF;
    }
    flags
}

impl<'a> Negotiation<'a> {
    pub(crate) fn new(offer: Offer<'a>, peer: &'a str, client_flags: u32, tls: TlsPhase) -> Self {
        Negotiation {
            offer,
            peer,
            no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta_for: None,
            tls,
        }
    }

    /// Handles one option; appends the replies to `out`.
    pub(crate) async fn on_option(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Step {
        if option == opt::SET_META_CONTEXT {
            // "replaces all previously-set metadata contexts (including when this command fails)"
            self.meta_for = None;
        }
        let parsed = match proto::parse_option(option, data) {
            Ok(parsed) => parsed,
            Err(err) if option == opt::EXPORT_NAME => {
                tracing::warn!(%err, "bad NBD_OPT_EXPORT_NAME");
                return Step::Close("malformed NBD_OPT_EXPORT_NAME");
            }
            Err(err) => {
                proto::put_option_error(out, option, rep::ERR_INVALID, &err.to_string());
                return Step::Continue;
            }
        };
        if self.tls == TlsPhase::Required
            && !matches!(parsed, ClientOption::Abort | ClientOption::StartTls)
        {
            if option == opt::EXPORT_NAME {
                // It has no error reply: the protocol says to close.
                return Step::Close(
                    "NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS",
                );
            }
            proto::put_option_error(
                out,
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first (e.g. nbds:// URIs, nbd-client -x)",
            );
            return Step::Continue;
        }
        match parsed {
            ClientOption::Abort => {
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Close(CLIENT_ABORTED)
            }
            ClientOption::StartTls => self.start_tls(option, data, out),
            ClientOption::Unsupported(code) => {
                proto::put_option_error(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    &format!("option {code} is not supported"),
                );
                Step::Continue
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            ClientOption::List => {
                self.list(option, out).await;
                Step::Continue
            }
            ClientOption::MetaContext { set, name, queries } => {
                self.meta_context(option, set, name, &queries, out);
                Step::Continue
            }
            ClientOption::Info { go, name, requests } => {
                self.info(option, go, &name, &requests, out).await
            }
            ClientOption::ExportName(name) => match self.attach(&name, true).await {
                Ok(attached) => {
                    out.extend_from_slice(&proto::export_name_reply(
                        attached.attachment.entry.size,
                        attached.flags,
                        self.no_zeroes,
                    ));
                    Step::Transmit(Box::new(attached))
                }
                // NBD_OPT_EXPORT_NAME has no error reply: the connection closes.
                Err(_) => Step::Close(EXPORT_REFUSED),
            },
        }
    }

    fn start_tls(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Step {
        let refusal = match self.tls {
            TlsPhase::Unavailable => Some((
                rep::ERR_POLICY,
                "TLS is not offered here ([nbd] tls = \"off\", or a unix socket)",
            )),
            TlsPhase::Active => Some((rep::ERR_INVALID, "TLS is already on")),
            _ if !data.is_empty() => Some((rep::ERR_INVALID, "NBD_OPT_STARTTLS carries no data")),
            _ => None,
        };
        if let Some((code, message)) = refusal {
            proto::put_option_error(out, option, code, message);
            return Step::Continue;
        }
        proto::put_option_reply(out, option, rep::ACK, &[]);
        Step::StartTls
    }

    async fn list(&self, option: u32, out: &mut BytesMut) {
        if !self.offer.base_exports {
            proto::put_option_reply(out, option, rep::ACK, &[]);
            return;
        }
        match self.offer.exports.list().await {
            Ok(entries) => {
                for entry in entries {
                    proto::put_option_reply(
                        out,
                        option,
                        rep::SERVER,
                        &proto::server_entry(&entry.name, &entry.description),
                    );
                }
                proto::put_option_reply(out, option, rep::ACK, &[]);
            }
            Err(err) => {
                tracing::warn!(%err, "listing exports failed");
                proto::put_option_error(
                    out,
                    option,
                    rep::ERR_PLATFORM,
                    &format!("cannot list exports: {err}"),
                );
            }
        }
    }

    fn meta_context(
        &mut self,
        option: u32,
        set: bool,
        name: String,
        queries: &[String],
        out: &mut BytesMut,
    ) {
        if set && !self.structured {
            proto::put_option_error(
                out,
                option,
                rep::ERR_INVALID,
                "negotiate structured replies before meta contexts",
            );
            return;
        }
        // An empty query list asks for everything; "base:" is a wildcard only when listing.
        let matched = if queries.is_empty() {
            !set
        } else {
            queries
                .iter()
                .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
        };
        if matched {
            proto::put_option_reply(
                out,
                option,
                rep::META_CONTEXT,
                // Ids in replies to LIST are reserved and zero; SET assigns the real one.
                &proto::meta_context(if set { BASE_ALLOCATION_ID } else { 0 }, BASE_ALLOCATION),
            );
        }
        if set {
            self.meta_for = matched.then_some(name);
        }
        proto::put_option_reply(out, option, rep::ACK, &[]);
    }

    async fn info(
        &mut self,
        option: u32,
        go: bool,
        name: &str,
        requests: &[u16],
        out: &mut BytesMut,
    ) -> Step {
        let attached = match self.attach(name, go).await {
            Ok(attached) => attached,
            Err((code, message)) => {
                proto::put_option_error(out, option, code, &message);
                return Step::Continue;
            }
        };
        proto::put_option_reply(
            out,
            option,
            rep::INFO,
            &proto::info_export(attached.attachment.entry.size, attached.flags),
        );
        if requests.contains(&info::NAME) {
            proto::put_option_reply(
                out,
                option,
                rep::INFO,
                &proto::info_string(info::NAME, &attached.attachment.entry.name),
            );
        }
        if requests.contains(&info::DESCRIPTION) {
            proto::put_option_reply(
                out,
                option,
                rep::INFO,
                &proto::info_string(info::DESCRIPTION, &attached.attachment.entry.description),
            );
        }
        let geometry = attached.attachment.source.geometry();
        let maximum = geometry.maximum.min(self.offer.max_request);
        proto::put_option_reply(
            out,
            option,
            rep::INFO,
            &proto::info_block_size(geometry.minimum, geometry.preferred.min(maximum), maximum),
        );
        proto::put_option_reply(out, option, rep::ACK, &[]);
        if go {
            Step::Transmit(Box::new(attached))
        } else {
            Step::Continue
        }
    }

    /// Opens `name` as the client would get it; on refusal, the option error and message
    /// (logged, but a refusal repeated within [`crate::refusals::WINDOW`] only once).
    async fn attach(&self, name: &str, go: bool) -> Result<Attached, (u32, String)> {
        let attached = self.attach_unlogged(name, go).await;
        if let Err((_, message)) = &attached {
            let is_session = matches!(ExportName::parse(name), ExportName::Session(_));
            self.offer
                .refusals
                .log(self.peer, name, message, is_session);
        }
        attached
    }

    async fn attach_unlogged(&self, name: &str, go: bool) -> Result<Attached, (u32, String)> {
        let resolved = match (name, self.offer.default_export) {
            ("", Some(default)) => default,
            ("", None) => {
                return Err((
                    rep::ERR_UNKNOWN,
                    "no default export is configured; ask for an export by name (nbdinfo --list shows them)".to_owned(),
                ));
            }
            _ => name,
        };
        let is_session = matches!(ExportName::parse(resolved), ExportName::Session(_));
        if !is_session && !self.offer.base_exports {
            return Err((
                rep::ERR_POLICY,
                format!(
                    "export {:?} refused: plain image names are off on this server \
                     (they are on by default only when it listens on loopback; see [nbd] \
                     base_exports); clients reach their vdisks through session exports, s/<token>",
                    loggable_export_name(resolved)
                ),
            ));
        }
        let request = AttachRequest {
            name: resolved,
            peer: self.peer,
            protocol: crate::KIND,
            intent: if go { Intent::Use } else { Intent::Probe },
        };
        let attachment = self.offer.exports.attach(request).await.map_err(|err| {
            let code = match err.kind() {
                ErrorKind::PermissionDenied => rep::ERR_POLICY,
                ErrorKind::Conflict if is_session => rep::ERR_POLICY,
                ErrorKind::InvalidInput if !is_session => rep::ERR_INVALID,
                ErrorKind::Shutdown => rep::ERR_SHUTDOWN,
                _ => rep::ERR_UNKNOWN,
            };
            (code, err.to_string())
        })?;
        // `entry.name` stays the canonical name (what NBD_INFO_NAME reports); the meta
        // context selection is matched against the name exactly as the client sent it.
        let base_allocation = self.structured && self.meta_for.as_deref() == Some(name);
        Ok(Attached {
            flags: transmission_flags(&attachment.source, self.structured),
            attachment,
            structured: self.structured,
            base_allocation,
        })
    }
}
