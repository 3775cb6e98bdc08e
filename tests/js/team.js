// Drives Particle's official JavaScript client (particle-api-js) against a live otacloud
// server, as a Particle user would: team calls, a member's sign-in, an API user.
// Usage: node team.js BASE_URL OWNER_TOKEN PRODUCT USERNAME PASSWORD
// Prints one JSON object of what each call returned (tests/test_particle_api_js.py checks it).
'use strict';

const Particle = require('particle-api-js');

async function statusOf(promise) {
	try {
		const response = await promise;
		return response.statusCode;
	} catch (error) {
		return error.statusCode;
	}
}

async function main() {
	const [baseUrl, ownerToken, product, username, password] = process.argv.slice(2);
	const particle = new Particle({ baseUrl });
	const out = {};

	const invited = await particle.inviteTeamMember({ username, product, auth: ownerToken });
	out.invite = { statusCode: invited.statusCode, body: invited.body };
	out.team = (await particle.listTeamMembers({ product, auth: ownerToken })).body;

	const login = await particle.login({ username, password, tokenDuration: 3600 });
	const memberToken = login.body.access_token;
	out.memberProducts = (await particle.listProducts({ auth: memberToken })).body;

	const created = await particle.post({
		uri: `/v1/products/${product}/team`,
		auth: ownerToken,
		data: { friendly_name: 'js bot', scopes: ['devices:list'] },
	});
	out.created = created.body;
	const botToken = created.body.created.tokens[0].token;
	out.botDevices = (await particle.listDevices({ product, auth: botToken })).body;
	out.botListProductsStatus = await statusOf(particle.listProducts({ auth: botToken }));
	out.botFirmwareStatus = await statusOf(particle.listProductFirmware({ product, auth: botToken }));

	const removed = await particle.removeTeamMember({ username, product, auth: ownerToken });
	out.remove = { statusCode: removed.statusCode };
	out.memberAfterRemoveStatus = await statusOf(particle.getProduct({ product, auth: memberToken }));
	out.teamAfter = (await particle.listTeamMembers({ product, auth: ownerToken })).body;
	process.stdout.write(JSON.stringify(out));
}

main().catch((error) => {
	process.stderr.write(`${error.stack || error}\n${JSON.stringify(error.body || {})}\n`);
	process.exit(1);
});
