"""The networks: the UNet, the teacher (MNISTDiffusion), the student (DirectDecoder), the classifier, the image
encoder and the discriminator, each with its loading."""
