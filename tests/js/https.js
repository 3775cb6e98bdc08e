// Drives Particle's official JavaScript client (particle-api-js) against an otacloud server
// over HTTPS, trusting the installation's CA the way Node.js does it for any client:
// NODE_EXTRA_CA_CERTS=<data>/pki/ca.pem. Certificate checks stay on (no rejectUnauthorized,
// no NODE_TLS_REJECT_UNAUTHORIZED): without the CA the first call fails.
// Usage: node https.js BASE_URL USERNAME PASSWORD PRODUCT FIRMWARE_FILE
// Prints one JSON object of what each call returned (tests/test_https_particle_js.py checks it).
'use strict';

const Particle = require('particle-api-js');

async function main() {
	const [baseUrl, username, password, product, firmwareFile] = process.argv.slice(2);
	if (!baseUrl.startsWith('https://')) {
		throw new Error(`the base URL must be https://, not ${baseUrl}`);
	}
	const particle = new Particle({ baseUrl });
	const out = {};

	const login = await particle.login({ username, password, tokenDuration: 3600 });
	const auth = login.body.access_token;
	out.login = { statusCode: login.statusCode, tokenType: login.body.token_type };
	out.product = (await particle.getProduct({ product, auth })).body;
	const uploaded = await particle.uploadProductFirmware({
		file: firmwareFile, // a path: read by the client (fs.createReadStream)
		version: 1, title: 'over https', description: 'uploaded by particle-api-js', product, auth,
	});
	out.upload = { statusCode: uploaded.statusCode, body: uploaded.body };
	// releaseProductFirmware sends no "force": Particle refuses a version no device has run
	// yet without it, so the generic put carries it (as team.js does for the team call).
	const released = await particle.put({
		uri: `/v1/products/${product}/firmware/release`, auth,
		data: { version: 1, product_default: true, force: true },
	});
	out.release = { statusCode: released.statusCode, body: released.body };
	out.firmware = (await particle.listProductFirmware({ product, auth })).body;
	out.devices = (await particle.listDevices({ product, auth })).body;
	process.stdout.write(JSON.stringify(out));
}

main().catch((error) => {
	const cause = error.error || error;
	process.stderr.write(`${cause.code || ''} ${cause.message || error}\n${JSON.stringify(error.body || {})}\n${error.stack || ''}\n`);
	process.exit(1);
});
