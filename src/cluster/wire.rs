//! What nodes say to each other, as typed values with one encoding each.
//!
//! - Subjects: the mailbox stream's (`chat.mb.<id>`), and those of an id's holder
//!   (`chat.hold.<id>.take`, `.mail`, `.frames`), built and read here only.
//! - Headers of a forwarded batch: who sent it, and whether the receiver's mailbox
//!   holds earlier frames of its senders.
//! - A forwarded batch is its frames, back to back in their server -> client encoding.
//! - The answer to a forwarded batch is one line per frame, in the batch's order:
//!   `stored`, `full <why>` or `failed <why>`.
//!
//! Nodes of the previous release write and read the same subjects, headers and lines,
//! so old and new nodes understand each other during a rolling upgrade.

use bytes::Bytes;

use crate::store::{Failure, Outcome};

/// The stream's subjects: one per receiver.
pub const MAILBOX_SUBJECTS: &str = "chat.mb.*";
/// Names the node that forwarded a batch.
pub const NODE_HEADER: &str = "Chat-Node";
/// Present when the receiver's mailbox holds earlier frames of the batch's senders.
pub const BEHIND_HEADER: &str = "Chat-Behind";

/// `receiver`'s subject in the mailbox stream.
pub fn mailbox(receiver: u32) -> String {
    format!("chat.mb.{receiver}")
}

/// What one node asks of the node that holds an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Let the id go (request/reply; the reply comes once it has).
    Take,
    /// Frames were stored for the id: read them.
    Mail,
    /// Take these frames (request/reply; the reply is their outcomes).
    Frames,
}

impl Hold {
    fn word(self) -> &'static str {
        match self {
            Hold::Take => "take",
            Hold::Mail => "mail",
            Hold::Frames => "frames",
        }
    }
}

/// The subject on which `receiver`'s holder hears `what`.
pub fn hold(receiver: u32, what: Hold) -> String {
    format!("chat.hold.{receiver}.{}", what.word())
}

/// Every subject `receiver`'s holder listens on.
pub fn holds(receiver: u32) -> String {
    format!("chat.hold.{receiver}.*")
}

/// What a holder heard on `subject`, if it is one of [`holds`]'s.
pub fn held(subject: &str) -> Option<Hold> {
    [Hold::Take, Hold::Mail, Hold::Frames]
        .into_iter()
        .find(|h| {
            subject
                .strip_suffix(h.word())
                .is_some_and(|s| s.ends_with('.'))
        })
}

/// Where the answer to batch `token` goes: under the forwarding node's inbox.
pub fn answer_to(inbox: &str, token: u64) -> String {
    format!("{inbox}.{token}")
}

/// Every answer to this node's batches.
pub fn answers(inbox: &str) -> String {
    format!("{inbox}.*")
}

/// The batch an answer on `subject` is for.
pub fn answered(subject: &str) -> Option<u64> {
    subject.rsplit('.').next().and_then(|t| t.parse().ok())
}

/// Cuts a forwarded batch into its server -> client frames; `None` if it is not
/// whole frames.
pub fn split_frames(payload: &Bytes) -> Option<Vec<Bytes>> {
    let header = crate::protocol::SERVER_HEADER_LEN;
    let mut frames = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let len = payload.get(at + 5..at + header)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let end = at.checked_add(header)?.checked_add(len)?;
        frames.push(payload.get(at..end).map(|_| payload.slice(at..end))?);
        at = end;
    }
    Some(frames)
}

/// Why JetStream did not take a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The receiver's subject holds `--mailbox-max-messages` already.
    Full,
    /// Anything else, in the client's or the server's words.
    Failed(String),
}

/// Classifies a failed publish. The server reports a full subject with the code it
/// uses for every failed store (10077), so the description tells them apart.
pub fn refused(e: &async_nats::jetstream::context::PublishError) -> Refused {
    use async_nats::jetstream::{self, ErrorCode};
    let js = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    match js {
        Some(js)
            if js.error_code() == ErrorCode::STREAM_STORE_FAILED
                && js.to_string().contains("maximum messages per subject") =>
        {
            Refused::Full
        }
        _ => Refused::Failed(e.to_string()),
    }
}

/// The answer to a forwarded batch: one line per outcome.
pub fn encode_outcomes(outcomes: &[Outcome]) -> String {
    let mut text = String::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Stored => text.push_str("stored"),
            Outcome::Full(why) => {
                text.push_str("full ");
                text.push_str(why);
            }
            Outcome::Failed(why) => {
                text.push_str("failed ");
                text.push_str(&why.to_string());
            }
        }
        text.push('\n');
    }
    text
}

/// One frame's outcome from its line of an answer; no line means the node that held
/// the receiver gave none for this frame.
pub fn decode_outcome(line: Option<&str>) -> Outcome {
    match line {
        Some("stored") => Outcome::Stored,
        Some(line) => match line.strip_prefix("full ") {
            Some(why) => Outcome::Full(why.to_string()),
            None => {
                let why = line.strip_prefix("failed ").unwrap_or(line);
                Outcome::Failed(Failure::Remote(why.to_string()))
            }
        },
        None => Outcome::Failed(Failure::NoAnswer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_the_previous_release_s_and_read_back() {
        assert_eq!(mailbox(7), "chat.mb.7");
        assert_eq!(hold(7, Hold::Take), "chat.hold.7.take");
        assert_eq!(hold(7, Hold::Mail), "chat.hold.7.mail");
        assert_eq!(hold(7, Hold::Frames), "chat.hold.7.frames");
        assert_eq!(holds(7), "chat.hold.7.*");
        for h in [Hold::Take, Hold::Mail, Hold::Frames] {
            assert_eq!(held(&hold(42, h)), Some(h));
        }
        assert_eq!(held("chat.hold.7.unmail"), None);
        assert_eq!(held("chat.hold.7.other"), None);
        assert_eq!(answer_to("_INBOX.abc", 12), "_INBOX.abc.12");
        assert_eq!(answers("_INBOX.abc"), "_INBOX.abc.*");
        assert_eq!(answered("_INBOX.abc.12"), Some(12));
        assert_eq!(answered("_INBOX.abc.x"), None);
    }

    #[test]
    fn a_batch_splits_into_whole_frames_only() {
        let a = crate::protocol::notice(crate::protocol::Code::Pong, "a");
        let b = crate::protocol::notice(crate::protocol::Code::Pong, "bb");
        let batch = Bytes::from([a.clone(), b.clone()].concat());
        assert_eq!(split_frames(&batch), Some(vec![a, b]));
        assert_eq!(split_frames(&Bytes::new()), Some(vec![]));
        assert_eq!(split_frames(&batch.slice(..batch.len() - 1)), None);
        assert_eq!(split_frames(&batch.slice(..4)), None);
    }

    #[test]
    fn a_full_subject_is_told_from_other_refusals() {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let js = |text: &str, code: u64| -> async_nats::jetstream::Error {
            let json = format!(r#"{{"code":503,"err_code":{code},"description":"{text}"}}"#);
            serde_json::from_str(&json).expect("an error")
        };
        let full = PublishError::with_source(
            PublishErrorKind::Other,
            js("maximum messages per subject exceeded", 10077),
        );
        assert_eq!(refused(&full), Refused::Full);
        let other = PublishError::with_source(PublishErrorKind::Other, js("disk full", 10077));
        assert!(matches!(refused(&other), Refused::Failed(t) if t.contains("disk full")));
        let timeout = PublishError::new(PublishErrorKind::TimedOut);
        assert!(matches!(refused(&timeout), Refused::Failed(_)));
    }

    #[test]
    fn outcomes_cross_between_nodes_with_their_words() {
        let sent = [
            Outcome::Stored,
            Outcome::Full("holds the limit of --mailbox-max-messages".into()),
            Outcome::Failed(Failure::NatsUnreachable),
        ];
        let text = encode_outcomes(&sent);
        assert_eq!(
            text,
            "stored\nfull holds the limit of --mailbox-max-messages\nfailed NATS is unreachable\n"
        );
        let mut lines = text.lines();
        let got: Vec<Outcome> = (0..4).map(|_| decode_outcome(lines.next())).collect();
        assert_eq!(got[0], Outcome::Stored);
        assert_eq!(got[1], sent[1]);
        // A refusal keeps its words, as the other node's.
        assert_eq!(
            got[2],
            Outcome::Failed(Failure::Remote("NATS is unreachable".into()))
        );
        if let Outcome::Failed(why) = &got[2] {
            assert_eq!(why.to_string(), "NATS is unreachable");
        }
        assert_eq!(got[3], Outcome::Failed(Failure::NoAnswer));
    }
}
