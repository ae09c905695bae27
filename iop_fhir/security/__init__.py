"""Who is asking and what they may do: access tokens, the client registry and signing keys, SMART scopes, the
authorization server (/auth), the request guard. What a partner's client may see is the privacy package's rule."""
