// Package payload decodes device messages: SenML JSON and SenML CBOR (RFC 8428)
// and a plain JSON object. It resolves record names relative to the sending
// device and rejects names that point at another device. It knows nothing of
// transports, device kinds or stores.
package payload
