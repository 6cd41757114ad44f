//! What nodes say to each other about frames, as typed values with one encoding each.
//!
//! The answer to a forwarded batch is one line per frame, in the batch's order:
//! `stored`, `full <why>` or `failed <why>`. Nodes of the previous release write and
//! read the same lines, so old and new nodes understand each other.

use crate::store::{Failure, Outcome};

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
