// Package dpop makes DPoP proofs (RFC 9449) with private keys that stay in
// the broker's process.
//
// A DPoP-bound access token is usable only with a fresh proof signed by the
// key it is bound to. The broker holds that key, like it holds a client
// secret, and signs a proof for every request made with the token: to the
// token endpoint when it asks for one, and for each caller's API request. A
// token copied out of a caller's memory, a log or a proxy is worthless
// without a proof, and a proof is worthless for any other method, URL or
// token.
//
// What it guarantees:
//
//   - A Key never reveals its private part: it signs, and gives out its
//     public JWK and RFC 7638 thumbprint. Errors name the key file, never
//     its content.
//   - Every proof is new: a random 128-bit jti, iat from the caller's clock,
//     typ "dpop+jwt", the public key as the header's jwk, htm as given and
//     htu without query or fragment (scheme and host lowercased, a default
//     port dropped); ath (base64url of the SHA-256 of the access token) when
//     a token is given, and the nonce when one is.
//   - Only asymmetric algorithms that fit the key: ES256 (EC P-256), EdDSA
//     (Ed25519), RS256 and PS256 (RSA of at least 2048 bits).
//   - A Keyring reads its key file again at each Current call (each token
//     request), so a changed file is used for the next token, and keeps the
//     keys it has read, by thumbprint, so that tokens bound to an earlier
//     key keep getting proofs from that key until they expire.
package dpop
