package server

import (
	"fmt"
	"sync"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// keyrings are the DPoP keyrings of this process by key file and alg, kept
// across configuration reloads: a keyring remembers the keys it has read,
// and tokens bound to an earlier key keep getting proofs from it after a
// reload as before one.
var keyrings sync.Map // keyringID → *dpop.Keyring

type keyringID struct{ path, alg string }

// keyringFor returns the keyring of c's dpop: key (nil without one), having
// read the key once so that a bad key file fails the configuration.
func keyringFor(c config.Credential) (*dpop.Keyring, error) {
	if c.DPoP == nil {
		return nil, nil
	}
	id := keyringID{c.DPoP.KeyFile, c.DPoP.Alg}
	v, _ := keyrings.LoadOrStore(id, dpop.NewKeyring(id.path, id.alg))
	ring := v.(*dpop.Keyring)
	if _, err := ring.Current(); err != nil {
		return nil, fmt.Errorf("%s.dpop.key_file: %w", c.Key(), err)
	}
	return ring, nil
}

// callerRules are c's allowed_callers as policy rules.
func callerRules(c config.Credential) ([]policy.Rule, error) {
	rules := make([]policy.Rule, len(c.AllowedCallers))
	for j, a := range c.AllowedCallers {
		rules[j] = policy.Rule{Pattern: a.Caller, Scopes: a.Scopes}
		for k, u := range a.URLs {
			p, err := policy.ParseURLPrefix(u)
			if err != nil {
				return nil, fmt.Errorf("%s.allowed_callers[%d].urls[%d]: %w", c.Key(), j, k, err)
			}
			rules[j].URLs = append(rules[j].URLs, p)
		}
	}
	return rules, nil
}
