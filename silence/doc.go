// Package silence holds the operators' decisions about alerts: silences (mute
// every notification whose labels match, for a while, as Alertmanager does)
// and acknowledgements (someone is on it). Both persist across restarts (in a
// file on one machine; in cluster mode through a Replica, a key-value bucket
// every node watches) and a silence expires on its own.
//
// It owns the matching, the store and its file, and the HTTP endpoints that
// change them. It must not evaluate rules or deliver notifications: Gate sits
// between the rules engine and the notifier and only decides whether an event
// goes on.
package silence
