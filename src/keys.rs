//! Redis key names of a conversation (the layout lua/common.lua documents).

/// Key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeySpace {
    prefix: String,
}

impl KeySpace {
    /// `prefix` is already validated: `lock:` or `<alphanumeric>:lock:`.
    pub(crate) fn new(prefix: String) -> Self {
        KeySpace { prefix }
    }

    /// `<prefix>{<id>}`: the conversation's one key (a hash), and also its
    /// wake-up channel's name.
    ///
    /// The id is the hash tag, so the key and the channel share one Redis
    /// Cluster slot. `%`, `{` and `}` are percent-encoded: a brace in the id
    /// would otherwise end the tag early (an id starting with `}` would even
    /// give an empty tag), and the encoding is one-to-one, so two ids never
    /// share a key.
    pub(crate) fn key(&self, conversation_id: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + conversation_id.len() + 2);
        key.push_str(&self.prefix);
        key.push('{');
        for c in conversation_id.chars() {
            match c {
                '%' => key.push_str("%25"),
                '{' => key.push_str("%7B"),
                '}' => key.push_str("%7D"),
                c => key.push(c),
            }
        }
        key.push('}');
        key
    }
}

/// The Redis keys of one conversation as every script takes them (`KEYS`):
/// since the scripts' v2 (library `ticketlock_v2`) that is one key, a hash,
/// whose name is also the conversation's wake-up channel. For operators and
/// other clients.
///
/// ```
/// let keys = ticketlock::conversation_keys(None, "conv-1").unwrap();
/// assert_eq!(keys, ["lock:{conv-1}"]);
/// let keys = ticketlock::conversation_keys(Some("bot1"), "a}b").unwrap();
/// assert_eq!(keys[0], "bot1:lock:{a%7Db}");
/// ```
pub fn conversation_keys(
    key_prefix: Option<&str>,
    conversation_id: &str,
) -> Result<[String; 1], crate::LockError> {
    crate::validate::conversation_id(conversation_id)?;
    let prefix = match key_prefix {
        Some(p) => crate::validate::key_prefix(p)?,
        None => crate::validate::DEFAULT_KEY_PREFIX.to_owned(),
    };
    Ok([KeySpace::new(prefix).key(conversation_id)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_one_hash_tag() {
        let keys = KeySpace::new("lock:".into());
        assert_eq!(keys.key("conv-1"), "lock:{conv-1}");
        assert_eq!(keys.key("}a{b%"), "lock:{%7Da%7Bb%25}");
        assert_eq!(keys.key("a:b*?[x] é"), "lock:{a:b*?[x] é}");
    }

    #[test]
    fn distinct_ids_never_share_a_key() {
        let keys = KeySpace::new("lock:".into());
        let ids = ["a", "a}", "a%7D", "%", "%25", "{", "a}:q", "a:q", "}"];
        let mut all: Vec<String> = ids.iter().map(|id| keys.key(id)).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
